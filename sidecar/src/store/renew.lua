-- renew: extend the leases of claims whose holders are still delivering. One
-- call renews a batch of keys, one after the other, atomically.
--
-- KEYS[i]  in-progress key of item i             (<prefix>p:<digest>)
-- then 2 arguments per item i, from ARGV[1 + 2 * (i - 1)]:
--   token     token (32 hex chars)
--   lease     the new lease in ms, from now
--
-- Returns one entry per item: 1 renewed, 0 stale (the token no longer holds
-- the key: the lease ran out, and the key was taken over, completed, or is
-- free). A stale holder is not given the key back: another delivery may have
-- claimed and finished it meanwhile, and only that holder's token counts.

local out = {}
for i = 1, #KEYS do
  local a = 1 + 2 * (i - 1)
  local held = redis.call('GET', KEYS[i])
  if held and string.sub(held, -32) == ARGV[a] then
    redis.call('PEXPIRE', KEYS[i], ARGV[a + 1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
