-- settle.lua: commits, releases or resizes one reservation on one subject (one hash slot),
-- exactly once. Each limit the reserve charged gets (new amount - reserved amount), in the
-- sub-bucket or period the reserve charged; a refund for a sub-bucket that already slid out is
-- dropped, an overrun is charged now, in full.
--
-- KEYS: 1 subject hash K, 2 reservation record R
-- ARGV: 1 SETTLE_NUMBERS: clock override (0 = Redis TIME), mode (COMMIT, RELEASE, RESIZE),
--         input tokens, cached input tokens, output tokens (resize: the new output cap),
--       2 how long a settled record is kept (ms, as text; to answer repeats)
-- Reply (packed_reply): status, input, cached, output, actual cost, reserved tokens, reserved
--   cost, then for a resize, per limit: remaining, reset ms (as reserve's); then the other
--   subjects (the opaque string reserve kept).
--   status: 1 applied, 2 a repeat of what is already done, 0 no such reservation,
--           3 already settled the other way

local K, R = KEYS[1], KEYS[2]
local COMMIT, RELEASE, RESIZE = 1, 2, 3
local clock, mode, input, cached, output = sunpack('<ddddd', ARGV[1])
local now = now_ms(clock)

local raw = redis.call('GET', R)
if not raw then return packed_reply(false, now, '[]', 0, 0, 0, 0, 0, 0, 0) end
local rec = parse_record(raw)

local function reply(status, limits)
  local u = rec.u
  if rec.s ~= 'c' then u = {0, 0, 0} end
  local actual = amounts(1, u[1], u[2], u[3], rec.pi, rec.pc, rec.po, 0)
  local reserved = amounts(1, rec.i, 0, rec.o, rec.pi, rec.pi, rec.po, 1)
  return packed_reply(limits, now, rec.sec, status, u[1], u[2], u[3], actual[COST],
                      reserved[TOKENS], reserved[COST])
end

if rec.s ~= 'r' then
  local repeated = (mode == COMMIT and rec.s == 'c') or (mode == RELEASE and rec.s == 'x')
  return reply(repeated and 2 or 3, false)
end

local reserved = amounts(1, rec.i, 0, rec.o, rec.pi, rec.pi, rec.po, 1)
local u
if mode == COMMIT then
  rec.u = {input, cached, output}
  u = amounts(1, rec.u[1], rec.u[2], rec.u[3], rec.pi, rec.pc, rec.po, 0)
elseif mode == RELEASE then
  u = amounts(0, 0, 0, 0, rec.pi, rec.pc, rec.po, 0)
else
  u = amounts(1, rec.i, 0, output, rec.pi, rec.pi, rec.po, 1)
end

local limits = rec.charges
if limits then
  local x = load_limits(K, limits, rec.fields, now)
  for k = 1, #limits do
    local lim = limits[k]
    local metric = lim[METRIC]
    local delta = u[metric] - reserved[metric]
    if delta ~= 0 then add_to_limit(lim, delta, lim[REF]) end
  end
  write_limits(K, limits, now, x)
end

if mode == RESIZE then
  rec.o = u[OUTPUT]
  local u_in, u_cached, u_out = unpack(rec.u)
  redis.call('SET', R, record('r', rec.e, rec.i, rec.o, rec.pi, rec.pc, rec.po, u_in, u_cached,
                              u_out, limits and #limits or 0) .. rec.raw:sub(REC_SIZE + 1),
            'KEEPTTL')
  return reply(1, limits)
end
rec.s = (mode == COMMIT) and 'c' or 'x'
-- a settled record only answers repeats
local u_in, u_cached, u_out = unpack(rec.u)
redis.call('SET', R, record(rec.s, rec.e, rec.i, rec.o, rec.pi, rec.pc, rec.po, u_in, u_cached,
                            u_out, 0) .. rec.sec, 'PX', ARGV[2])
return reply(1, false)
