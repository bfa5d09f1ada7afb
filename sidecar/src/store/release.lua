-- release: give a claim back so the key can be claimed again at once.
--
-- KEYS[1]  in-progress key of this digest   (<prefix>p:<digest>)
-- ARGV[1]  token (32 hex chars)
--
-- Returns 1 done, 0 stale (the token no longer holds the key).

local held = redis.call('GET', KEYS[1])
if held and string.sub(held, -32) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
