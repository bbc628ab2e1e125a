-- block_read.lua (ratelimitd/abuse/blocks.py): a subject's block field, with the time.
-- KEYS[1] the subject hash; ARGV: clock. Reply: {now, the `b` field (nil: none)}
return {now, redis.call('HGET', KEYS[1], 'b')}
