-- block_add.lua (ratelimitd/abuse/blocks.py): blocks a subject.
-- KEYS[1] the subject hash; ARGV: clock, ttl ms, reason. Reply: {now, ends}
local ends = now + tonumber(ARGV[2])
set_block(KEYS[1], ends, ARGV[3])
return {now, ends}
