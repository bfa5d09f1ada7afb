-- complete: record that the holder of a claim finished processing.
--
-- KEYS[1]  in-progress key of this digest   (<prefix>p:<digest>)
-- KEYS[2]  prefix of the completed buckets   (<prefix>c:<windowMs>:)
-- ARGV[1]  field: the digest without its shard bytes
-- ARGV[2]  shard number (string)
-- ARGV[3]  token (32 hex chars)
-- ARGV[4]  retention in ms
-- ARGV[5]  window width in ms
--
-- Returns 1 done, 0 stale (another holder has the key, or it is already
-- completed).
--
-- When the lease expired and nobody took the key over, the work was still
-- done: recording it stops a duplicate, so that case completes too.
-- The bucket of the current window expires `retention` after the window ends,
-- so a key is remembered for at least `retention` and at most
-- `retention + width`.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local width = tonumber(ARGV[5])
local retention = tonumber(ARGV[4])

local function bucket(window)
  return KEYS[2] .. string.format('%d', window) .. ':' .. ARGV[2]
end

local held = redis.call('GET', KEYS[1])
local fp = ''
if held then
  if string.sub(held, -32) ~= ARGV[3] then
    return 0
  end
  fp = string.sub(held, 1, #held - 32)
else
  for window = math.floor((now - retention) / width), math.floor(now / width) do
    if redis.call('HEXISTS', bucket(window), ARGV[1]) == 1 then
      return 0
    end
  end
end

local window = math.floor(now / width)
redis.call('HSET', bucket(window), ARGV[1], fp)
redis.call('PEXPIREAT', bucket(window), string.format('%d', (window + 1) * width + retention))
if held then
  redis.call('DEL', KEYS[1])
end
return 1
