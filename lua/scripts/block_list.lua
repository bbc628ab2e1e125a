-- block_list.lua (ratelimitd/abuse/blocks.py): the index of blocks, pruned of ended ones.
-- KEYS[1] the index; ARGV: clock, limit. Reply: {now, {member, ...}}
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {now, redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)}
