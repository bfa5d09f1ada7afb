-- meta: the head of settle.lua (prepended to it, so that it stays one
-- script run by SHA). It reads the partition's meta hash
-- (<prefix>m), creating it when it is missing, and gives the window layout.
--
-- The meta hash holds:
--   e          epoch: a random id written when the hash is created. A hash
--              that a sidecar has seen and then finds with another epoch
--              was lost (Redis restarted empty, a failover to a lagging
--              replica, a flush): a store reset.
--   w          window width in ms, fixed when the hash is created, so that a
--              change of the retention never renames the windows.
--   r, u       the longest retention in use (ms) and until when it matters:
--              a claim looks back max(its retention, r) until u.
--   reset      "<old epoch>><new epoch>@<ms>", written by the first sidecar
--              that notices a reset; removed when a person acknowledges it.
--   b:<window> shard bits of that window, chosen at its first completion.
--   n:<window> completions in that window (the observed rate).
--   x:<window> the earliest expiry (ms) of that window's marked buckets: a
--              completion that expires no later needs no look at the
--              expiry of a bucket it writes to (see settle.lua).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Bits of the 16-bit (or 24-bit) shard source that name a window's shard.
local DEFAULT_BITS = 12
-- Above 16 bits the shard takes the first byte of the field too.
local MAX_BITS = 20

local function win(n)
  return string.format('%d', n)
end

-- Whether any of the 2^DEFAULT_BITS buckets of a window exists: run once,
-- when a meta hash is created.
local function holds_buckets(prefix, width, window)
  local head = prefix .. 'c:' .. win(width) .. ':' .. win(window) .. ':'
  local names = {}
  for shard = 0, 2 ^ DEFAULT_BITS - 1 do
    names[#names + 1] = head .. string.format('%d', shard)
    if #names == 512 or shard == 2 ^ DEFAULT_BITS - 1 then
      if redis.call('EXISTS', unpack(names)) > 0 then
        return true
      end
      names = {}
    end
  end
  return false
end

-- How far back (ms) a claim with `retention` must look.
local function lookback(meta, retention)
  if now <= meta.u and meta.r > retention then
    return meta.r
  end
  return retention
end

-- One HMGET of the meta hash: the fields `head`, then the x field of window
-- `to` and the shard bits of windows `from`..`to`. Returns the answers to
-- `head`, and {bits, x}: bits by window (nil: nothing was completed there).
local function read_meta(key, head, from, to)
  local fields = {unpack(head)}
  fields[#fields + 1] = 'x:' .. win(to)
  for window = from, to do
    fields[#fields + 1] = 'b:' .. win(window)
  end
  local m = redis.call('HMGET', key, unpack(fields))
  local at = #head + 1
  local windows = {bits = {}, x = tonumber(m[at])}
  for window = from, to do
    local b = m[at + 1 + window - from]
    if b then
      windows.bits[window] = tonumber(b)
    end
  end
  return m, windows
end

-- Opens the meta hash of `prefix`; creates it (epoch `candidate`, width
-- `width`) when absent. Returns a table {key, epoch, width, r, u, reset,
-- current, oldest, bits, x}: the current window, the oldest that a claim with
-- `retention` looks at, the shard bits of those windows, and the current
-- window's x. One HMGET reads it all when the hash has width `width` and no
-- longer retention is in use, as nearly always; else a second reads the
-- windows.
local function open_meta(prefix, candidate, width, retention)
  local key = prefix .. 'm'
  local guess = tonumber(width)
  local from, to = math.floor((now - retention) / guess), math.floor(now / guess)
  local m, windows = read_meta(key, {'e', 'w', 'r', 'u', 'reset'}, from, to)
  local meta = {key = key}
  if not m[1] then
    meta.epoch, meta.width, meta.r, meta.u = candidate, guess, 0, 0
    redis.call('HSET', key, 'e', candidate, 'w', width)
    -- Buckets written before the meta hash existed used 12 shard bits and
    -- this same width (a quarter of the retention): keep the past windows
    -- that hold any readable. Only those: every window marked costs each
    -- claim a lookup. The current window is left to be sized by its first
    -- completion (12 bits too unless a rate is declared).
    for window = from, to - 1 do
      if holds_buckets(prefix, guess, window) then
        redis.call('HSET', key, 'b:' .. win(window), DEFAULT_BITS)
      end
    end
  else
    meta.epoch, meta.width = m[1], tonumber(m[2])
    meta.r, meta.u, meta.reset = tonumber(m[3] or '0'), tonumber(m[4] or '0'), m[5]
  end
  local w = meta.width
  meta.current = math.floor(now / w)
  meta.oldest = math.floor((now - lookback(meta, retention)) / w)
  if not m[1] or w ~= guess or meta.oldest ~= from then
    windows = select(2, read_meta(key, {}, meta.oldest, meta.current))
  end
  meta.bits, meta.x = windows.bits, windows.x
  return meta
end

-- Bucket names up to the shard, by window: built once per call, since
-- formatting numbers is a good part of a script's cost.
local bucket_heads = {}

-- The shard source of a digest: its first three bytes as a number, read from
-- the in-progress key `key`, whose digest starts at byte `at`.
local function digest_source(key, at)
  local b0, b1, b2 = string.byte(key, at, at + 2)
  return (b0 * 256 + b1) * 256 + b2
end

-- The shard last formatted: a key's windows mostly share their shard bits,
-- so a claim looking in several formats its shard once.
local last_source, last_bits, last_shard

-- The bucket (hash key) and field of a digest in a window of `bits` shard
-- bits. `source` is the first three bytes of the digest as a number, `field`
-- the digest past its first two bytes.
local function locate(prefix, width, window, bits, source, field)
  local head = bucket_heads[window]
  if not head then
    head = prefix .. 'c:' .. win(width) .. ':' .. win(window) .. ':'
    bucket_heads[window] = head
  end
  if source ~= last_source or bits ~= last_bits then
    last_source, last_bits = source, bits
    last_shard = string.format('%d', math.floor(source / 2 ^ (24 - bits)))
  end
  if bits > 16 then
    field = string.sub(field, 2)
  end
  return head .. last_shard, field
end
