-- settle.lua: commits, releases or resizes one reservation on one subject (one hash slot),
-- exactly once. Each limit the reserve charged gets (new amount - reserved amount), in the
-- sub-bucket or period the reserve charged; a refund for a sub-bucket that already slid out is
-- dropped, an overrun is charged now, in full.
--
-- KEYS: 1 subject hash K, 2 in-flight set Z, 3 reservation record R
-- ARGV: 1 clock override ('' = Redis TIME), 2 mode (commit | release | resize),
--       3 reservation id, 4 how long a settled record is kept (ms, for repeats),
--       5 input tokens, 6 cached input tokens, 7 output tokens (resize: the new output cap)
-- Reply: {status, state, input, cached, output, actual cost, reserved tokens, reserved cost,
--         other subjects}
--   status: 1 applied, 2 a repeat of what is already done, 0 no such reservation,
--           3 already settled the other way (state tells which)

local K, Z, R = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms(ARGV[1])
local mode, rid, keep = ARGV[2], ARGV[3], tonumber(ARGV[4])

local raw = redis.call('GET', R)
if not raw then return {0, '', 0, 0, 0, 0, 0, 0, ''} end
local rec = cjson.decode(raw)
local pi, pc, po = tonumber(rec.pi), tonumber(rec.pc), tonumber(rec.po)
local input, output = tonumber(rec.i), tonumber(rec.o)
local reserved = usage_of(1, input, 0, output, pi, pi, po)

local function reply(status)
  local u = rec.u or {0, 0, 0}
  local actual = usage_of(1, u[1], u[2], u[3], pi, pc, po)
  return {status, rec.s, u[1], u[2], u[3], amount('c', actual),
          amount('t', reserved), amount('c', reserved), rec.sec}
end

if rec.s ~= 'r' then
  local repeat_ = (mode == 'commit' and rec.s == 'c') or (mode == 'release' and rec.s == 'x')
  return reply(repeat_ and 2 or 3)
end

local u
if mode == 'commit' then
  u = usage_of(1, tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), pi, pc, po)
elseif mode == 'release' then
  u = usage_of(0, 0, 0, 0, pi, pc, po)
else
  u = usage_of(1, input, 0, tonumber(ARGV[7]), pi, pi, po)
end

local limits = {}
for k, c in ipairs(rec.l) do
  limits[k] = {lid = c[1], algo = c[2], metric = c[3], limit = tonumber(c[4]), p1 = c[5],
               p2 = tonumber(c[6]), ref = tonumber(c[7]), amt = tonumber(c[8])}
end
load_limits(K, Z, limits, now)

local out = {}
for k, lim in ipairs(limits) do
  local new_amt = amount(lim.metric, u)
  local delta = new_amt - lim.amt
  if delta ~= 0 then add_to_limit(lim, delta, lim.ref, out) end
  rec.l[k][8] = int(new_amt)
end
write_limits(K, limits, out)
keep_alive(K, state_ttl(limits, now))

if mode == 'resize' then
  rec.o = int(u.output)
  redis.call('SET', R, cjson.encode(rec), 'KEEPTTL')
  reserved = usage_of(1, input, 0, u.output, pi, pi, po)
  return reply(1)
end
if rec.z == 1 then redis.call('ZREM', Z, rid) end
rec.s = (mode == 'commit') and 'c' or 'x'
rec.u = {u.input, tonumber(ARGV[6]) or 0, u.output}
if mode == 'release' then rec.u = {0, 0, 0} end
rec.l = nil  -- a settled record only answers repeats
redis.call('SET', R, cjson.encode(rec), 'PX', int(keep))
return reply(1)
