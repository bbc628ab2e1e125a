-- key_create.lua (ratelimitd/auth/keys/): a new key's record, unless its id is taken.
-- KEYS[1] the record; ARGV: clock, lifetime ms (0 = none), retention ms, then field/value
-- pairs. Reply: {1, now, expires} | {0, now, 0} taken
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, now, 0} end
local life = tonumber(ARGV[2])
local expires = 0
if life > 0 then expires = now + life end
redis.call('HSET', KEYS[1], 'c', now, 'e', expires, 'r', 0, unpack(ARGV, 4))
if expires > 0 then redis.call('PEXPIRE', KEYS[1], expires - now + tonumber(ARGV[3])) end
return {1, now, expires}
