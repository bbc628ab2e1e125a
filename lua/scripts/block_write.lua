-- block_write.lua (ratelimitd/abuse/): shared by the scripts that write a block into a
-- subject hash K (field `b`: DOUBLE the block's end, then the reason; see lua/block.lua).

-- The end of the block in `raw` (a `b` or `x` field), 0 for none.
local function block_end(raw)
  if raw and #raw >= DOUBLE_SIZE then return (struct.unpack(DOUBLE_FORMAT, raw)) end
  return 0
end

-- Writes the block and keeps K, and its `x` field, alive past the block's end, so the
-- reserve's own PEXPIRE never cuts the block short.
local function set_block(K, ends, reason)
  redis.call('HSET', K, 'b', struct.pack(DOUBLE_FORMAT, ends) .. reason)
  local keep = ends + 1000
  if block_end(redis.call('HGET', K, 'x')) < keep then
    redis.call('HSET', K, 'x', struct.pack(DOUBLE_FORMAT, keep))
  end
  local pttl = redis.call('PTTL', K)
  if pttl < keep - now then redis.call('PEXPIRE', K, keep - now) end
end
