-- complete: record that the holders of claims finished processing. One call
-- completes a batch of keys of one partition, one after the other,
-- atomically. meta.lua is prepended to this file.
--
-- KEYS[i]  in-progress key of item i             (<prefix>p:<digest>)
-- ARGV[1]  the partition's key prefix            (idemq:{<consumer>}:)
-- ARGV[2]  epoch to write if the meta hash is missing
-- ARGV[3]  window width (ms) to use if the meta hash is missing
-- ARGV[4]  completions expected per second in this partition (declared), or 0
-- then 4 arguments per item i, from ARGV[5 + 4 * (i - 1)]:
--   field     the digest past its first two bytes
--   source    the digest's first three bytes, as a number (picks the shard)
--   token     token (32 hex chars)
--   retention retention in ms
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
local n = #KEYS
local longest = 0
for i = 1, n do
  longest = math.max(longest, tonumber(ARGV[5 + 4 * (i - 1) + 3]))
end
local meta = open_meta(prefix, ARGV[2], ARGV[3], longest)
local w = meta.width
local current = math.floor(now / w)
local reach = lookback(meta, longest)
local oldest = math.floor((now - reach) / w)
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
local function complete(key, field, source, token, retention)
  local held = redis.call('GET', key)
  local fp = ''
  if held then
    if string.sub(held, -32) ~= token then
      return 0
    end
    fp = string.sub(held, 1, #held - 32)
  else
    for window = math.floor((now - lookback(meta, retention)) / w), current do
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
  local expiry = (current + 1) * w + retention
  if redis.call('PEXPIRETIME', bucket) < expiry then
    redis.call('PEXPIREAT', bucket, string.format('%d', expiry))
  end
  if held then
    redis.call('DEL', key)
  end
  return 1
end

local out = {}
for i = 1, n do
  local a = 5 + 4 * (i - 1)
  out[i] = complete(KEYS[i], ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3]))
end

if added > 0 then
  redis.call('HINCRBY', meta.key, 'n:' .. win(current), added)
end
-- Remember the longest retention in use, so that shorter-lived claims still
-- look back far enough for what it keeps.
if longest > meta.r or now > meta.u or now + longest > meta.u then
  redis.call('HSET', meta.key, 'r', math.max(longest, (now <= meta.u) and meta.r or 0),
    'u', string.format('%d', now + longest + w))
end
return out
