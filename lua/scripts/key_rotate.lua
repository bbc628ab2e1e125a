-- key_rotate.lua (ratelimitd/auth/keys/): marks a key rotated to a new one, its expiry cut to
-- now + grace. KEYS[1] the old key's record; ARGV: clock, new key id, grace ms, max age ms
-- (0 = none), retention ms.
-- Reply: {1, now, old key's new expiry} | {0 unknown | -1 revoked | -2 rotated | -3 expired, now}
local v = redis.call('HMGET', KEYS[1], 'h', 'c', 'e', 'r', 'rt')
if not v[1] then return {0, now} end
if tonumber(v[4]) > 0 then return {-1, now} end
if v[5] and v[5] ~= '' then return {-2, now} end
local created, expires, max_age = tonumber(v[2]), tonumber(v[3]), tonumber(ARGV[4])
if max_age > 0 and (expires == 0 or created + max_age < expires) then
  expires = created + max_age
end
if expires > 0 and now >= expires then return {-3, now} end
local ends = now + tonumber(ARGV[3])
if expires > 0 and expires < ends then ends = expires end
redis.call('HSET', KEYS[1], 'rt', ARGV[2], 'e', ends)
redis.call('PEXPIRE', KEYS[1], ends - now + tonumber(ARGV[5]))
return {1, now, ends}
