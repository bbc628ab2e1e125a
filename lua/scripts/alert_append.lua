-- alert_append.lua (ratelimitd/alerts/streams.py): an alert onto its subject's list.
-- KEYS[1] the subject's list; ARGV[1] its cap, ARGV[2] its ttl (ms), ARGV[3..] the fields.
redis.call('LPUSH', KEYS[1], cjson.encode({unpack(ARGV, 3)}))
redis.call('LTRIM', KEYS[1], 0, ARGV[1] - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
