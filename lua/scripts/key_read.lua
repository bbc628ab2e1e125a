-- key_read.lua (ratelimitd/auth/keys/): a key's record as stored, for `show`.
-- KEYS[1] the record; ARGV: clock. Reply: {now, the record's fields (nil: none)}
return {now, redis.call('HMGET', KEYS[1], 'h', 'u', 'o', 't', 'c', 'e', 'r', 'rt', 'rf', 'sg', 's')}
