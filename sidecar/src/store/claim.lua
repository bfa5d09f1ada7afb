-- claim: take idempotency keys, or say why not. One call claims a batch of
-- keys of one partition and one retention, one after the other, atomically.
-- meta.lua is prepended to this file.
--
-- KEYS[i]  in-progress key of item i             (<prefix>p:<digest>)
-- ARGV[1]  the partition's key prefix            (idemq:{<consumer>}:)
-- ARGV[2]  epoch this sidecar saw last, or ''
-- ARGV[3]  epoch to write if the meta hash is missing
-- ARGV[4]  window width (ms) to use if the meta hash is missing
-- ARGV[5]  '1' to refuse claims while a reset is unacknowledged (failClosed)
-- ARGV[6]  retention in ms
-- then 4 arguments per item i, from ARGV[7 + 4 * (i - 1)]:
--   field     the digest past its first two bytes
--   fp        fingerprint (8 bytes) or ''
--   token     token (32 hex chars)
--   lease     lease in ms
--
-- Returns {epoch, reset, {item...}}: the partition's epoch, its
-- unacknowledged reset record or '', and one number per item: -1 acquired;
-- -2 completed; -3 conflict (same key, other fingerprint); -4 refused: a
-- reset awaits acknowledgement; 0 or more: in flight, that many ms left of
-- the holder's lease. (Numbers, not tables: a reply of one array of
-- integers is what a script builds and Redis encodes cheapest.)
--
-- The in-progress value is fingerprint .. token; the key's TTL is the lease.
-- Completed keys are fields of hashes bucketed by completion window and by
-- shard, so a claim looks at every window still in its look-back. Time comes
-- from the server so that every replica of a consumer agrees on the windows.

local prefix, seen, candidate, fail_closed = ARGV[1], ARGV[2], ARGV[3], ARGV[5] == '1'
local retention = tonumber(ARGV[6])
local n = #KEYS

local meta = open_meta(prefix, candidate, ARGV[4], retention)
local reset = meta.reset
if seen ~= '' and seen ~= meta.epoch and not reset then
  reset = seen .. '>' .. meta.epoch .. '@' .. string.format('%d', now)
  redis.call('HSET', meta.key, 'reset', reset)
end

local ACQUIRED, COMPLETED, CONFLICT, REFUSED = -1, -2, -3, -4

local out = {}
if reset and fail_closed then
  for i = 1, n do
    out[i] = REFUSED
  end
  return {meta.epoch, reset, out}
end

local w = meta.width
local newest = math.floor(now / w)
local oldest = math.floor((now - lookback(meta, retention)) / w)
local bits = window_bits(meta, oldest, newest)
local digest_at = #prefix + 3

local function differs(stored, fp)
  return stored ~= '' and fp ~= '' and stored ~= fp
end

local function claim(key, field, fp, token, lease)
  local source = digest_source(key, digest_at)
  -- Newest window first: a duplicate is most often of a recent message.
  -- Windows without shard bits saw no completion: nothing to look up.
  -- (A key is never both completed and in progress: completing deletes the
  -- in-progress key, and a claim of a completed key stops here.)
  for window = newest, oldest, -1 do
    local b = bits[window]
    if b then
      local bucket, f = locate(prefix, w, window, b, source, field)
      local stored = redis.call('HGET', bucket, f)
      if stored then
        if differs(stored, fp) then
          return CONFLICT
        end
        return COMPLETED
      end
    end
  end

  -- Take the key if free, else read its holder: one command either way.
  local held = redis.call('SET', key, fp .. token, 'NX', 'GET', 'PX', lease)
  if held then
    if differs(string.sub(held, 1, #held - 32), fp) then
      return CONFLICT
    end
    -- Never below 0, which would read as another status.
    return math.max(redis.call('PTTL', key), 0)
  end
  return ACQUIRED
end

for i = 1, n do
  local a = 7 + 4 * (i - 1)
  out[i] = claim(KEYS[i], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
end
return {meta.epoch, reset or '', out}
