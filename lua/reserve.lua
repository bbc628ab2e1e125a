-- reserve.lua: checks and reserves one call's estimated usage on every limit of one subject
-- (one hash slot), all or nothing, granting the largest output cap that every limit allows.
--
-- KEYS: 1 subject hash K, 2 in-flight set Z, 3 reservation record R
-- ARGV: 1 clock override ('' = Redis TIME), 2 mode (reserve | dry | retry), 3 reservation id,
--       4 reservation ttl ms, 5 input tokens, 6 requested output cap, 7 minimum output,
--       8 input price, 9 cached-input price, 10 output price (micro-USD per 1M tokens),
--       11 other subjects of the reservation (opaque, kept in the record), 12 limit count,
--       13.. limit specs (see parse_limits)
--       mode retry: an idempotent retry; an existing record answers instead of a new charge.
-- Reply: {status, granted output, expires at ms, denying limit (1-based, 0 = none),
--         retry after ms (-1 = never fits), input tokens, then per limit: remaining, reset ms}
--   status: 1 reserved, 0 denied, 2 the record of an earlier identical reserve, 3 dry run.

local K, Z, R = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms(ARGV[1])
local mode, rid, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local input, cap, min_out = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local pi, pc, po = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local limits = parse_limits(13, tonumber(ARGV[12]))

load_limits(K, Z, limits, now)

local function reply(status, granted, expires, deny, retry, inp)
  local out = {status, granted, expires, deny, retry, inp}
  for _, lim in ipairs(limits) do
    local remaining, reset = describe(lim, now)
    out[#out + 1] = remaining; out[#out + 1] = reset
  end
  return out
end

for _, lim in ipairs(limits) do
  if lim.stale then return redis.error_reply('ERR calendar boundaries do not cover Redis time') end
end

if mode == 'retry' then
  local prev = redis.call('GET', R)
  if prev then
    local rec = cjson.decode(prev)
    if rec.s ~= 'x' then return reply(2, rec.o, rec.e, 0, 0, rec.i) end
  end
end

-- The largest output every limit still allows; limits that cannot fit even the minimum deny.
local est = usage_of(1, input, 0, 0, pi, pi, po)
local floor_out = math.min(min_out, cap)
local grant, denied = cap, {}
for k, lim in ipairs(limits) do
  local room = capacity_left(lim)
  local max_out
  if lim.metric == 'n' then
    max_out = (room >= 1) and cap or -1
  elseif lim.metric == 'c' then
    if po == 0 then
      max_out = (amount('c', est) <= room) and cap or -1
    else
      max_out = math.floor((room * 1000 - est.fixed) / po)
    end
  elseif lim.metric == 't' then
    max_out = room - input
  elseif lim.metric == 'o' then
    max_out = room
  else
    max_out = (amount(lim.metric, est) <= room) and cap or -1
  end
  if max_out < floor_out then
    denied[#denied + 1] = k
  elseif max_out < grant then
    grant = max_out
  end
end

if #denied > 0 then
  est.output = floor_out
  local retry = 0
  for _, k in ipairs(denied) do
    local lim = limits[k]
    local need = (lim.metric == 'n') and 1 or amount(lim.metric, est)
    local r = retry_after(K, Z, lim, need, now)
    if r < 0 or retry < 0 then retry = -1 elseif r > retry then retry = r end
  end
  return reply(0, 0, 0, denied[1], retry, input)
end

est.output = grant
local out, charges, inflight = {}, {}, false
for _, lim in ipairs(limits) do
  if lim.metric == 'n' then
    inflight = true
    lim.used = lim.used + 1
  else
    local amt = amount(lim.metric, est)
    local ref = 0
    if lim.algo == 's' then ref = lim.cur elseif lim.algo == 'c' then ref = lim.start end
    add_to_limit(lim, amt, nil, out)
    charges[#charges + 1] = {lim.lid, lim.algo, lim.metric, int(lim.limit),
                             lim.p1, int(lim.p2), int(ref), int(amt)}
  end
end

local expires = now + ttl
if mode ~= 'dry' then
  write_limits(K, limits, out)
  keep_alive(K, state_ttl(limits, now))
  if inflight then
    redis.call('ZREMRANGEBYSCORE', Z, '-inf', int(now))
    redis.call('ZADD', Z, int(expires), rid)
    redis.call('PEXPIRE', Z, int(ttl))
  end
  local rec = {s = 'r', e = int(expires), i = int(input), o = int(grant), pi = ARGV[8],
               pc = ARGV[9], po = ARGV[10], z = inflight and 1 or 0, l = charges, sec = ARGV[11]}
  redis.call('SET', R, cjson.encode(rec), 'PX', int(ttl))
end
return reply(mode == 'dry' and 3 or 1, grant, expires, 0, 0, input)
