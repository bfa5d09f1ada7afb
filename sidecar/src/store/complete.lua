-- complete: record that the holders of claims finished processing. One call
-- completes a batch of keys, one after the other, atomically.
--
-- KEYS[i]  in-progress key of item i             (<prefix>p:<digest>)
-- ARGV[1]  the consumer's key prefix             (idemq:{<consumer>}:)
-- then 5 arguments per item i, from ARGV[2 + 5 * (i - 1)]:
--   field     the digest without its shard bytes
--   shard     shard number (string)
--   token     token (32 hex chars)
--   retention retention in ms
--   width     window width in ms
--
-- Returns one entry per item: 1 done, 0 stale (another holder has the key, or
-- it is already completed).
--
-- When the lease expired and nobody took the key over, the work was still
-- done: recording it stops a duplicate, so that case completes too.
-- The bucket of the current window expires `retention` after the window ends,
-- so a key is remembered for at least `retention` and at most
-- `retention + width`.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]

local function complete(key, field, shard, token, retention, width)
  local w = tonumber(width)
  local r = tonumber(retention)
  local function bucket(window)
    return prefix .. 'c:' .. width .. ':' .. string.format('%d', window) .. ':' .. shard
  end

  local held = redis.call('GET', key)
  local fp = ''
  if held then
    if string.sub(held, -32) ~= token then
      return 0
    end
    fp = string.sub(held, 1, #held - 32)
  else
    for window = math.floor((now - r) / w), math.floor(now / w) do
      if redis.call('HEXISTS', bucket(window), field) == 1 then
        return 0
      end
    end
  end

  local window = math.floor(now / w)
  redis.call('HSET', bucket(window), field, fp)
  redis.call('PEXPIREAT', bucket(window), string.format('%d', (window + 1) * w + r))
  if held then
    redis.call('DEL', key)
  end
  return 1
end

local out = {}
for i = 1, #KEYS do
  local a = 2 + 5 * (i - 1)
  out[i] = complete(KEYS[i], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
end
return out
