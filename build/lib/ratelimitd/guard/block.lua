-- block.lua: reads a subject's block inside the reserve's own call (guard/blocks.py writes it).
--
-- A subject's block lives in its quota hash K = rl:{<scope>:<id>}, field `b`:
--   8 bytes: struct '<d' (little-endian double), the block's end in ms (Redis TIME, or the
--            engine's clock override: the same clock the reserve uses)
--   then:    the reason, UTF-8 (at most 800 bytes), as given by the admin or the guard
-- A `b` whose end is not after `now` is no block (the field may linger until the hash expires;
-- the writer keeps K alive at least until the end, and raises K's `x` field to match, so the
-- reserve's own PEXPIRE never cuts the block short).
--
-- To use it: add 'b' to the fields the reserve reads with its HMGET of K (e.g. {'x', 'b',
-- lids...} in limits_of, shifting the limits' values by one), then, before deciding:
--   local ends, reason = block_of(v[2], now)
--   if ends then return <a "blocked" reply with ends and reason> end
-- `sunpack` is common.lua's local for struct.unpack; nothing else is needed.

local function block_of(raw, now)
  if raw and #raw >= 8 then
    local ends = sunpack('<d', raw)
    if ends > now then return ends, raw:sub(9) end
  end
  return nil
end
