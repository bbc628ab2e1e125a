-- block.lua: a subject's block, read inside the reserve's own call.
--
-- ratelimitd/abuse/blocks.py writes it (admin blocks, credential-stuffing blocks, anomaly
-- blocks) into the subject hash K, field `b`: DOUBLE(the block's end, ms of the same clock
-- the reserve uses), then the reason (UTF-8). A `b` whose end is not after `now` is no block.
-- The writer keeps K, and its `x` field, alive until the block ends, so the reserve's own
-- PEXPIRE never cuts a block short.

-- The block's end and reason, or false.
local function block_of(raw, now)
  if raw and #raw >= DOUBLE_SIZE then
    local ends = sunpack(DOUBLE_FORMAT, raw)
    if ends > now then return ends, raw:sub(DOUBLE_SIZE + 1) end
  end
  return false
end
