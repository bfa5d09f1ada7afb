-- settle: complete, then claim, idempotency keys. One call runs a batch of
-- completions and claims of one partition and one retention, one after the
-- other, atomically: completions first, so that a duplicate claimed in the
-- same call as its original's completion finds it completed. meta.lua is
-- prepended to this file.
--
-- KEYS[1..c]      in-progress keys of the completions  (<prefix>p:<digest>)
-- KEYS[c+1..]     in-progress keys of the claims
-- ARGV[1]  the partition's key prefix            (idemq:{<consumer>}:)
-- ARGV[2]  epoch this sidecar saw last, or ''
-- ARGV[3]  epoch to write if the meta hash is missing
-- ARGV[4]  window width (ms) to use if the meta hash is missing
-- ARGV[5]  '1' to refuse claims while a reset is unacknowledged (failClosed)
-- ARGV[6]  retention in ms
-- ARGV[7]  completions expected per second in this partition (declared), or 0
-- ARGV[8]  c: how many of the keys are completions
-- then 2 arguments per completion i, from ARGV[9 + 2 * (i - 1)]:
--   field     the digest past its first two bytes
--   token     token (32 hex chars)
-- then 4 arguments per claim j, from ARGV[9 + 2 * c + 4 * (j - 1)]:
--   field     the digest past its first two bytes
--   fp        fingerprint (8 bytes) or ''
--   token     token (32 hex chars)
--   lease     lease in ms
--
-- Returns {epoch, reset, {claim...}, {completion...}}: the partition's epoch,
-- its unacknowledged reset record or '', one number per claim: -1 acquired;
-- -2 completed; -3 conflict (same key, other fingerprint); -4 refused: a
-- reset awaits acknowledgement; 0 or more: in flight, that many ms left of
-- the holder's lease; and one per completion: 1 done, 0 stale (another
-- holder has the key, or it is already completed). (Numbers, not tables: an
-- array of integers is what a script builds and Redis encodes cheapest.)
--
-- The in-progress value is fingerprint .. token; the key's TTL is the lease.
-- Completed keys are fields of hashes bucketed by completion window and by
-- shard, so a claim looks at every window still in its look-back. Time comes
-- from the server so that every replica of a consumer agrees on the windows.
--
-- A completion whose lease expired while nobody took the key over still
-- completes: the work was done, and recording it stops a duplicate.
-- A bucket expires `retention` after its window ends (the longest retention
-- written into it wins), so a key is remembered for at least `retention`
-- and at most `retention + width`.

-- A window's shards are sized for this many keys each: well under
-- hash-max-listpack-entries (512 by default), so that its hashes keep the
-- compact encoding even when the rate doubles from one window to the next.
local KEYS_PER_SHARD = 256
local ACQUIRED, COMPLETED, CONFLICT, REFUSED = -1, -2, -3, -4

local prefix, seen, candidate, fail_closed = ARGV[1], ARGV[2], ARGV[3], ARGV[5] == '1'
local retention = tonumber(ARGV[6])
local completions = tonumber(ARGV[8])
local claims = #KEYS - completions

local meta = open_meta(prefix, candidate, ARGV[4], retention)
local reset = meta.reset
if seen ~= '' and seen ~= meta.epoch and not reset then
  reset = seen .. '>' .. meta.epoch .. '@' .. string.format('%d', now)
  redis.call('HSET', meta.key, 'reset', reset)
end

local w, current, oldest, bits = meta.width, meta.current, meta.oldest, meta.bits
local digest_at = #prefix + 3

local function differs(stored, fp)
  return stored ~= '' and fp ~= '' and stored ~= fp
end

-- The first completion of a window sizes its shards, from the declared rate
-- or twice the previous window's count, and forgets the bookkeeping of
-- windows that no claim looks at any more.
local function size_current_window()
  local declared = tonumber(ARGV[7]) * w / 1000
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
    local window = tonumber(string.match(f, '^[bnx]:(%-?%d+)$'))
    if window and window < oldest - 1 then
      redis.call('HDEL', meta.key, f)
    end
  end
end

local added = 0
-- A bucket expires `retention` after its window ends.
local expiry = (current + 1) * w + retention
local expiry_arg = string.format('%d', expiry)
-- The earliest expiry of a bucket this call creates, to lower x by.
local created

-- Every bucket carries a marker, an empty field, written with its first key:
-- so the HSET that creates a bucket says so (2 fields added), and only then
-- does its expiry need setting. A bucket that exists expires no earlier than
-- the window's x, so a completion that expires no later than x does not look
-- at it; one with a longer retention (during a rollout that lengthens it)
-- does, and lengthens the bucket's life if need be.
local function expire(bucket, is_new)
  if is_new or not meta.x or expiry > meta.x then
    -- Never shorten a bucket's life: keys in it may carry a longer retention.
    local at = redis.call('PEXPIRETIME', bucket)
    if at < expiry then
      redis.call('PEXPIREAT', bucket, expiry_arg)
      at = expiry
    end
    if is_new and (not created or at < created) then
      created = at
    end
  end
end

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
  -- The key is new here (not completed, checked above), so 2 fields added
  -- means the marker was new too: a new bucket, or one from before markers.
  expire(bucket, redis.call('HSET', bucket, f, fp, '', '') == 2)
  added = added + 1
  if held then
    redis.call('DEL', key)
  end
  return 1
end

local function claim(key, field, fp, token, lease)
  local source = digest_source(key, digest_at)
  -- Newest window first: a duplicate is most often of a recent message.
  -- Windows without shard bits saw no completion: nothing to look up.
  -- (A key is never both completed and in progress: completing deletes the
  -- in-progress key, and a claim of a completed key stops here.)
  for window = current, oldest, -1 do
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

local done = {}
if completions > 0 then
  if not bits[current] then
    size_current_window()
  end
  for i = 1, completions do
    local a = 9 + 2 * (i - 1)
    done[i] = complete(KEYS[i], ARGV[a], ARGV[a + 1])
  end
  if added > 0 then
    redis.call('HINCRBY', meta.key, 'n:' .. win(current), added)
  end
  if created and (not meta.x or created < meta.x) then
    redis.call('HSET', meta.key, 'x:' .. win(current), string.format('%d', created))
  end
  -- Remember the longest retention in use, so that shorter-lived claims
  -- still look back far enough for what it keeps.
  if retention > meta.r or now > meta.u or now + retention > meta.u then
    redis.call('HSET', meta.key, 'r', math.max(retention, (now <= meta.u) and meta.r or 0),
      'u', string.format('%d', now + retention + w))
  end
end

local out = {}
local refuse = reset and fail_closed
local first = 9 + 2 * completions
for j = 1, claims do
  if refuse then
    out[j] = REFUSED
  else
    local a = first + 4 * (j - 1)
    out[j] = claim(KEYS[completions + j], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  end
end
return {meta.epoch, reset or '', out, done}
