-- complete: record that the holders of claims finished processing. One call
-- completes a batch of keys of one partition and one retention, one after
-- the other, atomically. meta.lua is prepended to this file.
--
-- KEYS[i]  in-progress key of item i             (<prefix>p:<digest>)
-- ARGV[1]  the partition's key prefix            (idemq:{<consumer>}:)
-- ARGV[2]  epoch to write if the meta hash is missing
-- ARGV[3]  window width (ms) to use if the meta hash is missing
-- ARGV[4]  completions expected per second in this partition (declared), or 0
-- ARGV[5]  retention in ms
-- then 2 arguments per item i, from ARGV[6 + 2 * (i - 1)]:
--   field     the digest past its first two bytes
--   token     token (32 hex chars)
--
-- Returns one entry per item: 1 done, 0 stale (another holder has the key, or
-- it is already completed).
--
-- When the lease expired and nobody took the key over, the work was still
-- done: recording it stops a duplicate, so that case completes too.
-- A bucket expires `retention` after its window ends (the longest retention
-- written into it wins), so a key is remembered for at least `retention`
-- and at most `retention + width`.

-- A window's shards are sized for this many keys each: well under
-- hash-max-listpack-entries (512 by default), so that its hashes keep the
-- compact encoding even when the rate doubles from one window to the next.
local KEYS_PER_SHARD = 256

local prefix = ARGV[1]
local retention = tonumber(ARGV[5])
local n = #KEYS
local meta = open_meta(prefix, ARGV[2], ARGV[3], retention)
local w = meta.width
local current = math.floor(now / w)
local oldest = math.floor((now - lookback(meta, retention)) / w)
local bits = window_bits(meta, oldest, current)

-- The first completion of a window sizes its shards, from the declared rate
-- or twice the previous window's count, and forgets the bookkeeping of
-- windows that no claim looks at any more.
if not bits[current] then
  local declared = tonumber(ARGV[4]) * w / 1000
  local previous = tonumber(redis.call('HGET', meta.key, 'n:' .. win(current - 1)) or '0')
  local expected = math.max(declared, 2 * previous)
  local b = DEFAULT_BITS
  if expected > 0 then
    b = 8
    while b < MAX_BITS and expected > KEYS_PER_SHARD * 2 ^ b do
      b = b + 1
    end
  end
  bits[current] = b
  redis.call('HSET', meta.key, 'b:' .. win(current), b)
  for _, f in ipairs(redis.call('HKEYS', meta.key)) do
    local window = tonumber(string.match(f, '^[bn]:(%-?%d+)$'))
    if window and window < oldest - 1 then
      redis.call('HDEL', meta.key, f)
    end
  end
end

local added = 0
local digest_at = #prefix + 3
-- A bucket expires `retention` after its window ends.
local expiry = (current + 1) * w + retention
local expiry_arg = string.format('%d', expiry)

local function complete(key, field, token)
  local source = digest_source(key, digest_at)
  local held = redis.call('GET', key)
  local fp = ''
  if held then
    if string.sub(held, -32) ~= token then
      return 0
    end
    fp = string.sub(held, 1, #held - 32)
  else
    for window = oldest, current do
      local b = bits[window]
      if b then
        local bucket, f = locate(prefix, w, window, b, source, field)
        if redis.call('HEXISTS', bucket, f) == 1 then
          return 0
        end
      end
    end
  end

  local bucket, f = locate(prefix, w, current, bits[current], source, field)
  added = added + redis.call('HSET', bucket, f, fp)
  -- Never shorten a bucket's life: keys in it may carry a longer retention.
  if redis.call('PEXPIRETIME', bucket) < expiry then
    redis.call('PEXPIREAT', bucket, expiry_arg)
  end
  if held then
    redis.call('DEL', key)
  end
  return 1
end

local out = {}
for i = 1, n do
  local a = 6 + 2 * (i - 1)
  out[i] = complete(KEYS[i], ARGV[a], ARGV[a + 1])
end

if added > 0 then
  redis.call('HINCRBY', meta.key, 'n:' .. win(current), added)
end
-- Remember the longest retention in use, so that shorter-lived claims still
-- look back far enough for what it keeps.
if retention > meta.r or now > meta.u or now + retention > meta.u then
  redis.call('HSET', meta.key, 'r', math.max(retention, (now <= meta.u) and meta.r or 0),
    'u', string.format('%d', now + retention + w))
end
return out
