-- reserve.lua: checks and reserves one call's estimated usage on every limit of one subject
-- (one hash slot), all or nothing, granting the largest output cap that every limit allows.
--
-- KEYS: 1 subject hash K, 2 reservation record R
-- ARGV: 1 RESERVE_NUMBERS: clock override (0 = Redis TIME), mode (RESERVE, DRY_RUN, RETRY),
--         reservation ttl ms, input tokens, requested output cap, minimum output, input,
--         cached-input and output prices (micro-USD per 1M tokens),
--       2 the reservation's other subjects (opaque, kept in the record),
--       3 the limit specs (SPEC each, see common.lua), 4 the reservation ttl ms as text (a
--       number passed to redis.call is formatted with printf, slowly)
--   mode RETRY: an idempotent retry; a live record of the same id answers instead.
-- Reply (packed_reply): status, granted output, expires at ms, denying limit (1-based, 0 =
--   none), retry after ms (-1 = never fits), input tokens, reserved cost (nano-USD), then per
--   limit: remaining, reset ms.
--   status: 1 reserved, 0 denied, 2 the record of an earlier identical reserve, 3 dry run.

local K, R = KEYS[1], KEYS[2]
local RESERVE, DRY_RUN, RETRY = 1, 2, 3
local clock, mode, ttl, input, cap, min_out, pi, pc, po = sunpack('<ddddddddd', ARGV[1])
local now = now_ms(clock)
local limits, fields = limits_of(ARGV[3])
local nl = #limits
local x = load_limits(K, limits, fields, now)
for k = 1, nl do
  if limits[k][ALGO] == ALG_CALENDAR and limits[k][STALE] then
    return redis.error_reply('ERR calendar boundaries do not cover Redis time')
  end
end

if mode == RETRY then
  local prev = redis.call('GET', R)
  if prev then
    local rec = parse_record(prev)
    if rec.s ~= 'x' then
      return packed_reply(limits, now, false, 2, rec.o, rec.e, 0, 0, rec.i,
                          ceil((rec.i * pi + rec.o * po) / 1000))
    end
  end
end

-- The largest output every limit still allows; a limit that cannot fit the minimum denies.
local est = amounts(1, input, 0, 0, pi, pi, po, 1)
local fixed = input * pi
local floor_out = min(min_out, cap)
local grant, denied = cap, nil
for k = 1, nl do
  local lim = limits[k]
  local room, m = lim[CAP] - lim[USED], lim[METRIC]
  local max_out
  if m == TOKENS then
    max_out = room - input
  elseif m == OUTPUT then
    max_out = room
  elseif m == COST and po > 0 then
    max_out = floor((room * 1000 - fixed) / po)
  else
    max_out = (est[m] <= room) and cap or -1
  end
  if max_out < floor_out then
    denied = denied or {}
    denied[#denied + 1] = k
  elseif max_out < grant then
    grant = max_out
  end
end

if denied then
  est = amounts(1, input, 0, floor_out, pi, pi, po, 1)
  local retry = 0
  for _, k in ipairs(denied) do
    local lim = limits[k]
    local r = retry_after(K, lim, est[lim[METRIC]], now)
    -- a concurrency slot frees when a call ends, usually long before its reservation expires
    if lim[METRIC] == CONCURRENT and r > 1000 then r = 1000 end
    if r < 0 or retry < 0 then retry = -1 elseif r > retry then retry = r end
  end
  return packed_reply(limits, now, false, 0, 0, 0, denied[1], retry, input, 0)
end

-- the estimate with the grant as its output (as amounts() would give it)
est[TOKENS], est[OUTPUT], est[COST] = input + grant, grant, ceil((fixed + grant * po) / 1000)
local expires = now + ttl
-- the record keeps the sub-bucket or period each limit charged: settle needs nothing else
local refs = array8()
for k = 1, nl do
  local lim = limits[k]
  add_to_limit(lim, est[lim[METRIC]], false)
  local algo = lim[ALGO]
  refs[k] = (algo == ALG_SLIDING and lim[CUR]) or (algo == ALG_CALENDAR and lim[START]) or 0
end
if mode ~= DRY_RUN then
  write_limits(K, limits, now, x)
  redis.call('SET', R, spack(record_format(nl), 'r', expires, input, grant, pi, pc, po, 0, 0, 0,
                             nl, unpack(refs, 1, nl)) .. ARGV[3] .. ARGV[2], 'PX', ARGV[4])
end
return packed_reply(limits, now, false, mode == DRY_RUN and 3 or 1, grant, expires, 0, 0, input,
                    est[COST])
