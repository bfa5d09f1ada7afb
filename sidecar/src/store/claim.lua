-- claim: take an idempotency key, or say why not.
--
-- KEYS[1]  in-progress key of this digest   (<prefix>p:<digest>)
-- KEYS[2]  prefix of the completed buckets   (<prefix>c:<windowMs>:)
-- ARGV[1]  field: the digest without its shard bytes
-- ARGV[2]  shard number (string)
-- ARGV[3]  fingerprint (8 bytes) or ''
-- ARGV[4]  token (32 hex chars)
-- ARGV[5]  lease in ms
-- ARGV[6]  retention in ms
-- ARGV[7]  window width in ms
--
-- Returns {'A', 0} acquired, {'C', 0} completed, {'I', pttl} in flight,
-- {'X', 0} conflict (same key, other fingerprint).
--
-- The in-progress value is fingerprint .. token; the key's TTL is the lease.
-- Completed keys are fields of hashes bucketed by completion window, so a
-- claim looks at every window still alive. Time comes from the server so
-- that every replica of a consumer agrees on the windows.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fp = ARGV[3]

local function differs(stored)
  return stored ~= '' and fp ~= '' and stored ~= fp
end

local held = redis.call('GET', KEYS[1])
if held then
  if differs(string.sub(held, 1, #held - 32)) then
    return {'X', 0}
  end
  return {'I', redis.call('PTTL', KEYS[1])}
end

local width = tonumber(ARGV[7])
local retention = tonumber(ARGV[6])
for window = math.floor((now - retention) / width), math.floor(now / width) do
  local stored = redis.call('HGET', KEYS[2] .. string.format('%d', window) .. ':' .. ARGV[2], ARGV[1])
  if stored then
    if differs(stored) then
      return {'X', 0}
    end
    return {'C', 0}
  end
end

redis.call('SET', KEYS[1], fp .. ARGV[4], 'PX', ARGV[5])
return {'A', 0}
