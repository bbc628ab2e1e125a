-- key_resolve.lua (ratelimitd/auth/keys/): the record of a key presented by a caller.
-- KEYS[1] the record; ARGV: clock, the key's hash. Reply: {now, 1, the record's fields} for a
-- key not revoked; {now, 0} unknown, {now, 2} revoked: alike in size and work (no oracle).
-- Lua compares interned strings by identity, so the hash compare takes the same time either way.
local v = redis.call('HMGET', KEYS[1], 'h', 'u', 'o', 't', 'c', 'e', 'r', 'rt', 'rf', 'sg', 's')
if v[1] ~= ARGV[2] or tonumber(v[7]) > 0 then
  return {now, (v[1] == ARGV[2]) and 2 or 0}
end
return {now, 1, v}
