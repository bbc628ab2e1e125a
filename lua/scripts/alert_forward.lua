-- alert_forward.lua (ratelimitd/alerts/streams.py): an alert onto the outbox, once.
-- KEYS[1] the outbox, KEYS[2] the alert's marker; ARGV[1] marker ttl (ms), ARGV[2] the cap,
-- ARGV[3..] the fields. Returns the entry id, or false when the alert was forwarded before.
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
