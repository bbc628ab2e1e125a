-- reserve.lua: checks and reserves one call's estimated usage on every limit of one subject
-- (one hash slot), all or nothing, granting the largest output cap that every limit allows.
--
-- KEYS: 1 subject hash K, 2 reservation record R
-- ARGV: 1 clock override ('' = Redis TIME), 2 mode (reserve | dry | retry),
--       3 reservation ttl ms, 4 input tokens, 5 requested output cap, 6 minimum output,
--       7 input price, 8 cached-input price, 9 output price (micro-USD per 1M tokens),
--       10 the reservation's other subjects (opaque, kept in the record), 11 limit count,
--       12.. limit specs, 6 values each (see new_limit)
--   mode retry: an idempotent retry; a live record of the same id answers instead.
-- Reply: {status, granted output, expires at ms, denying limit (1-based, 0 = none),
--         retry after ms (-1 = never fits), input tokens, reserved cost (nano-USD),
--         then per limit: remaining, reset ms}
--   status: 1 reserved, 0 denied, 2 the record of an earlier identical reserve, 3 dry run.

local K, R = KEYS[1], KEYS[2]
local now = now_ms(ARGV[1])
local mode, ttl = ARGV[2], tonumber(ARGV[3])
local input, cap, min_out = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local pi, po = tonumber(ARGV[7]), tonumber(ARGV[9])
local limits = parse_limits(12, tonumber(ARGV[11]))
local x = load_limits(K, limits, now)

local function reply(status, granted, expires, deny, retry, inp)
  local cost = 0
  if status ~= 0 then cost = amount('c', usage_of(1, inp, 0, granted, pi, pi, po)) end
  return with_states({status, granted, expires, deny, retry, inp, cost}, limits, now)
end

for _, lim in ipairs(limits) do
  if lim.stale then return redis.error_reply('ERR calendar boundaries do not cover Redis time') end
end

if mode == 'retry' then
  local prev = redis.call('GET', R)
  if prev then
    local rec = parse_record(prev)
    if rec.s ~= 'x' then return reply(2, rec.o, rec.e, 0, 0, rec.i) end
  end
end

-- The largest output every limit still allows; a limit that cannot fit the minimum denies.
local est = usage_of(1, input, 0, 0, pi, pi, po)
local floor_out = math.min(min_out, cap)
local grant, denied = cap, nil
for k, lim in ipairs(limits) do
  local room, m = capacity(lim) - lim.used, lim.metric
  local max_out
  if m == 't' then
    max_out = room - input
  elseif m == 'o' then
    max_out = room
  elseif m == 'c' and po > 0 then
    max_out = floor((room * 1000 - est.fixed) / po)
  else
    max_out = (amount(m, est) <= room) and cap or -1
  end
  if max_out < floor_out then
    denied = denied or {}
    denied[#denied + 1] = k
  elseif max_out < grant then
    grant = max_out
  end
end

if denied then
  est.output = floor_out
  local retry = 0
  for _, k in ipairs(denied) do
    local lim = limits[k]
    local r = retry_after(K, lim, amount(lim.metric, est), now)
    -- a concurrency slot frees when a call ends, usually long before its reservation expires
    if lim.metric == 'n' and r > 1000 then r = 1000 end
    if r < 0 or retry < 0 then retry = -1 elseif r > retry then retry = r end
  end
  return reply(0, 0, 0, denied[1], retry, input)
end

est.output = grant
-- The record keeps each limit's spec (its six ARGV words), the sub-bucket or period charged,
-- and the amount: settle needs nothing else.
local expires = now + ttl
local rec = {'r', expires, input, grant, pi, tonumber(ARGV[8]), po, 0, 0, 0, ARGV[10]}
for k, lim in ipairs(limits) do
  local amt = amount(lim.metric, est)
  add_to_limit(lim, amt, nil)
  local a, n = 12 + (k - 1) * 6, #rec
  rec[n + 1], rec[n + 2], rec[n + 3], rec[n + 4] = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  rec[n + 5], rec[n + 6], rec[n + 7], rec[n + 8] =
    ARGV[a + 4], ARGV[a + 5], (lim.algo == 's' and lim.cur) or lim.start or 0, amt
end

if mode ~= 'dry' then
  write_limits(K, limits, now, x)
  redis.call('SET', R, cmsgpack.pack(rec), 'PX', ttl)
end
return reply(mode == 'dry' and 3 or 1, grant, expires, 0, 0, input)
