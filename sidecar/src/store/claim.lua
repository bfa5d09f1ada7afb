-- claim: take idempotency keys, or say why not. One call claims a batch of
-- keys of one partition, one after the other, atomically. meta.lua is
-- prepended to this file.
--
-- KEYS[i]  in-progress key of item i             (<prefix>p:<digest>)
-- ARGV[1]  the partition's key prefix            (idemq:{<consumer>}:)
-- ARGV[2]  epoch this sidecar saw last, or ''
-- ARGV[3]  epoch to write if the meta hash is missing
-- ARGV[4]  window width (ms) to use if the meta hash is missing
-- ARGV[5]  '1' to refuse claims while a reset is unacknowledged (failClosed)
-- then 6 arguments per item i, from ARGV[6 + 6 * (i - 1)]:
--   field     the digest past its first two bytes
--   source    the digest's first three bytes, as a number (picks the shard)
--   fp        fingerprint (8 bytes) or ''
--   token     token (32 hex chars)
--   lease     lease in ms
--   retention retention in ms
--
-- Returns {epoch, reset, {item...}}: the partition's epoch, its
-- unacknowledged reset record or '', and one {status, pttl} per item: {'A', 0} acquired;
-- {'C', 0} completed; {'I', pttl} in flight; {'X', 0} conflict (same key,
-- other fingerprint); {'R', 0} refused: a reset awaits acknowledgement.
--
-- The in-progress value is fingerprint .. token; the key's TTL is the lease.
-- Completed keys are fields of hashes bucketed by completion window and by
-- shard, so a claim looks at every window still in its look-back. Time comes
-- from the server so that every replica of a consumer agrees on the windows.

local prefix, seen, candidate, fail_closed = ARGV[1], ARGV[2], ARGV[3], ARGV[5] == '1'
local n = #KEYS

local longest = 0
for i = 1, n do
  longest = math.max(longest, tonumber(ARGV[6 + 6 * (i - 1) + 5]))
end
local meta = open_meta(prefix, candidate, ARGV[4], longest)
local reset = meta.reset
if seen ~= '' and seen ~= meta.epoch and not reset then
  reset = seen .. '>' .. meta.epoch .. '@' .. string.format('%d', now)
  redis.call('HSET', meta.key, 'reset', reset)
end

local out = {}
if reset and fail_closed then
  for i = 1, n do
    out[i] = {'R', 0}
  end
  return {meta.epoch, reset, out}
end

local w = meta.width
local newest = math.floor(now / w)
local oldest = math.floor((now - lookback(meta, longest)) / w)
local bits = window_bits(meta, oldest, newest)

local function claim(key, field, source, fp, token, lease, retention)
  local function differs(stored)
    return stored ~= '' and fp ~= '' and stored ~= fp
  end

  -- Newest window first: a duplicate is most often of a recent message.
  -- Windows without shard bits saw no completion: nothing to look up.
  -- (A key is never both completed and in progress: completing deletes the
  -- in-progress key, and a claim of a completed key stops here.)
  for window = newest, math.floor((now - lookback(meta, retention)) / w), -1 do
    local b = bits[window]
    if b then
      local bucket, f = locate(prefix, w, window, b, source, field)
      local stored = redis.call('HGET', bucket, f)
      if stored then
        if differs(stored) then
          return 'X', 0
        end
        return 'C', 0
      end
    end
  end

  -- Take the key if free, else read its holder: one command either way.
  local held = redis.call('SET', key, fp .. token, 'NX', 'GET', 'PX', lease)
  if held then
    if differs(string.sub(held, 1, #held - 32)) then
      return 'X', 0
    end
    return 'I', redis.call('PTTL', key)
  end
  return 'A', 0
end

for i = 1, n do
  local a = 6 + 6 * (i - 1)
  local status, pttl = claim(KEYS[i], ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4], tonumber(ARGV[a + 5]))
  out[i] = {status, pttl}
end
return {meta.epoch, reset or '', out}
