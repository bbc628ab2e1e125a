-- now.lua: the clock of the scripts outside the function library, put first in each that
-- reads it. `now`: ARGV[1], a test clock's ms, or Redis TIME in ms when it is 0.
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
