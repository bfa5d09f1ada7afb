-- claim: take idempotency keys, or say why not. One call claims a batch of
-- keys, one after the other, atomically.
--
-- KEYS[i]  in-progress key of item i             (<prefix>p:<digest>)
-- ARGV[1]  the consumer's key prefix             (idemq:{<consumer>}:)
-- then 7 arguments per item i, from ARGV[2 + 7 * (i - 1)]:
--   field     the digest without its shard bytes
--   shard     shard number (string)
--   fp        fingerprint (8 bytes) or ''
--   token     token (32 hex chars)
--   lease     lease in ms
--   retention retention in ms
--   width     window width in ms
--
-- Returns one {status, pttl} per item: {'A', 0} acquired; {'C', 0} completed;
-- {'I', pttl} in flight; {'X', 0} conflict (same key, other fingerprint).
--
-- The in-progress value is fingerprint .. token; the key's TTL is the lease.
-- Completed keys are fields of hashes bucketed by completion window
-- (<prefix>c:<width>:<window>:<shard>), so a claim looks at every window still
-- alive. Time comes from the server so that every replica of a consumer
-- agrees on the windows.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]

local function claim(key, field, shard, fp, token, lease, retention, width)
  local function differs(stored)
    return stored ~= '' and fp ~= '' and stored ~= fp
  end

  local held = redis.call('GET', key)
  if held then
    if differs(string.sub(held, 1, #held - 32)) then
      return 'X', 0
    end
    return 'I', redis.call('PTTL', key)
  end

  local buckets = prefix .. 'c:' .. width .. ':'
  local w = tonumber(width)
  local r = tonumber(retention)
  -- Newest window first: a duplicate is most often of a recent message.
  for window = math.floor(now / w), math.floor((now - r) / w), -1 do
    local stored = redis.call('HGET', buckets .. string.format('%d', window) .. ':' .. shard, field)
    if stored then
      if differs(stored) then
        return 'X', 0
      end
      return 'C', 0
    end
  end

  redis.call('SET', key, fp .. token, 'PX', lease)
  return 'A', 0
end

local out = {}
for i = 1, #KEYS do
  local a = 2 + 7 * (i - 1)
  local status, pttl = claim(KEYS[i], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
    ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
  out[i] = {status, pttl}
end
return out
