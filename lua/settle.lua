-- settle.lua: commits, releases or resizes one reservation on one subject (one hash slot),
-- exactly once. Each limit the reserve charged gets (new amount - reserved amount), in the
-- sub-bucket or period the reserve charged; a refund for a sub-bucket that already slid out is
-- dropped, an overrun is charged now, in full.
--
-- KEYS: 1 subject hash K, 2 reservation record R
-- ARGV: 1 clock override ('' = Redis TIME), 2 mode (commit | release | resize),
--       3 how long a settled record is kept (ms, to answer repeats),
--       4 input tokens, 5 cached input tokens, 6 output tokens (resize: the new output cap)
-- Reply: {status, state, input, cached, output, actual cost, reserved tokens, reserved cost,
--         other subjects}, then for a resize, per limit: remaining, reset ms (as reserve's)
--   status: 1 applied, 2 a repeat of what is already done, 0 no such reservation,
--           3 already settled the other way (state says which: c committed, x released)

local K, R = KEYS[1], KEYS[2]
local now = now_ms(ARGV[1])
local mode, keep = ARGV[2], tonumber(ARGV[3])

local raw = redis.call('GET', R)
if not raw then return {0, '', 0, 0, 0, 0, 0, 0, '[]'} end
local rec = parse_record(raw)

local function reply(status)
  local u = rec.u
  if rec.s ~= 'c' then u = {0, 0, 0} end
  local actual = usage_of(1, u[1], u[2], u[3], rec.pi, rec.pc, rec.po)
  local reserved = usage_of(1, rec.i, 0, rec.o, rec.pi, rec.pi, rec.po)
  return {status, rec.s, u[1], u[2], u[3], amount('c', actual), amount('t', reserved),
          amount('c', reserved), rec.sec}
end

if rec.s ~= 'r' then
  local repeated = (mode == 'commit' and rec.s == 'c') or (mode == 'release' and rec.s == 'x')
  return reply(repeated and 2 or 3)
end

local u
if mode == 'commit' then
  rec.u = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
  u = usage_of(1, rec.u[1], rec.u[2], rec.u[3], rec.pi, rec.pc, rec.po)
  u.inflight = 0
elseif mode == 'release' then
  u = usage_of(0, 0, 0, 0, rec.pi, rec.pc, rec.po)
  u.inflight = 0
else
  u = usage_of(1, rec.i, 0, tonumber(ARGV[6]), rec.pi, rec.pi, rec.po)
end

local limits = rec.charges
local x = load_limits(K, limits, now)
local r = rec.r
for _, lim in ipairs(limits) do
  local new_amt = amount(lim.metric, u)
  if new_amt ~= lim.amt then add_to_limit(lim, new_amt - lim.amt, lim.ref) end
  r[lim.at + 7] = new_amt
end
write_limits(K, limits, now, x)

if mode == 'resize' then
  rec.o, r[4] = u.output, u.output
  redis.call('SET', R, cmsgpack.pack(r), 'KEEPTTL')
  return with_states(reply(1), limits, now)
end
rec.s = (mode == 'commit') and 'c' or 'x'
r[1], r[8], r[9], r[10] = rec.s, rec.u[1], rec.u[2], rec.u[3]
for j = #r, REC_CHARGES, -1 do r[j] = nil end   -- a settled record only answers repeats
redis.call('SET', R, cmsgpack.pack(r), 'PX', keep)
return reply(1)
