-- key_revoke.lua (ratelimitd/auth/keys/): revokes a key.
-- KEYS[1] the record; ARGV: clock, retention ms.
-- Reply: {0 unknown | 1 revoked now | 2 already, now, revoked at}
local v = redis.call('HMGET', KEYS[1], 'h', 'r')
if not v[1] then return {0, now, 0} end
local at = tonumber(v[2])
if at > 0 then return {2, now, at} end
redis.call('HSET', KEYS[1], 'r', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return {1, now, now}
