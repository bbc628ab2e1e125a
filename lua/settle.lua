-- settle.lua: commits, releases or resizes one reservation on one subject (one hash slot),
-- exactly once. Each limit the reserve charged gets (new amount - reserved amount), in the
-- sub-bucket or period the reserve charged; a refund for a sub-bucket that already slid out is
-- dropped, an overrun is charged now, in full.
--
-- KEYS: 1 subject hash K, 2 reservation record R, 3 the subject's alert list (alerts.lua)
-- ARGV: 1 SETTLE_ARGS (wire.py): clock override (0 = Redis TIME), mode, input tokens, cached
--         input tokens, output tokens (MODE_RESIZE: the new output cap), the attempt
--         (MODE_CANCEL: the reserve attempt to cancel), how long a settled record is kept (ms;
--         to answer repeats), the lowest cost alert threshold (ppm); then every threshold
--         (doubles, ppm, ascending; none: no cost alerts)
--   MODE_COMMIT also decides cost alerts (alerts.lua) and feeds the anomaly state (anomaly.lua);
--   the settled record keeps the alerts, so a repeat answers the same.
--   MODE_CANCEL: a record of that attempt is released; another attempt's record is left alone
--   (SETTLE_CONFLICT); no record becomes a released one of that attempt, which bars the
--   attempt's reserve should it still run (a timed-out call may run late).
-- Reply (packed_reply): wire.py's SETTLE_REPLY fields, then for a resize, per limit: remaining,
--   reset ms (as reserve's); then the other subjects (the opaque string reserve kept), then
--   the alerts the commit fired.

local K, R, AK = KEYS[1], KEYS[2], KEYS[3]
local args = ARGV[1]
local clock, mode, input, cached, output, attempt, kept_ms, lowest =
  sunpack(SETTLE_ARGS_FORMAT, args)
local now = now_ms(clock)

local raw = redis.call('GET', R)
if not raw then
  local head = reply_head()
  head[SETTLED_STATUS] = SETTLE_NOT_FOUND
  if mode == MODE_CANCEL then
    local barred = record(RECORD_RELEASED, now, 0, 0, 0, 0, 0, 0, 0, 0, attempt, 0)
    redis.call('SET', R, barred .. '[]', 'PX', ms_text(kept_ms))
    head[SETTLED_STATUS] = SETTLE_APPLIED
  end
  return packed_reply(false, now, '[]', head)
end
local rec = parse_record(raw)

if mode == MODE_CANCEL then
  if rec.attempt ~= attempt then return settled_reply(rec, now, SETTLE_CONFLICT, false) end
  mode = MODE_RELEASE
end
if rec.state ~= RECORD_RESERVED then
  local repeated = (mode == MODE_COMMIT and rec.state == RECORD_COMMITTED)
                   or (mode == MODE_RELEASE and rec.state == RECORD_RELEASED)
  return settled_reply(rec, now, repeated and SETTLE_DUPLICATE or SETTLE_CONFLICT, false)
end

local reserved = amounts(RESERVED_AMOUNTS, 1, rec.input, 0, rec.output, rec.pi, rec.pi,
                         rec.po, 1)
local u
if mode == MODE_COMMIT then
  local actual = rec.actual
  actual[1], actual[2], actual[3] = input, cached, output
  u = amounts(USED_AMOUNTS, 1, input, cached, output, rec.pi, rec.pc, rec.po, 0)
elseif mode == MODE_RELEASE then
  u = amounts(USED_AMOUNTS, 0, 0, 0, 0, rec.pi, rec.pc, rec.po, 0)
else
  u = amounts(USED_AMOUNTS, 1, rec.input, 0, output, rec.pi, rec.pi, rec.po, 1)
end

local limits, fields = rec.charges, rec.fields
if not limits then limits, fields = limits_of('') end
-- A limit the settle leaves as it is need not be loaded, unless the reply reports it (a
-- resize) or a cost alert may read it.
local deltas, unused = SETTLE_DELTAS, SETTLE_UNUSED
for k = 1, #limits do
  local metric = limits[k][METRIC]
  local delta = u[metric] - reserved[metric]
  deltas[k] = delta
  unused[k] = delta == 0 and mode ~= MODE_RESIZE and metric ~= METRIC_COST_USD
end
local x, _, anomaly_raw = load_limits(K, limits, fields, now, unused)
local n, need = changed_fields(K, limits, deltas, rec.refs, unused, now)
local extra, fired = false, false
if mode == MODE_COMMIT then
  if #args > SETTLE_ARGS_SIZE then
    local a
    a, fired = cost_alerts(K, AK, now, limits, lowest, args, SETTLE_ARGS_SIZE + 1)
    if a then extra = {'a', a} end
  end
  local st = anomaly_raw and anomaly_state(anomaly_raw, now, false, false)
  if st then
    count_commit(st, u[METRIC_TOKENS])
    if extra then
      extra[3], extra[4] = 'n', pack_anomaly(st)
    else
      extra = ANOMALY_FIELD
      extra[2] = pack_anomaly(st)
    end
  end
end
store_fields(K, n, now, x, extra, ANOMALY_KEEP_MS, need)

local u_in, u_cached, u_out = unpack(rec.actual)
if mode == MODE_RESIZE then
  rec.output = u[METRIC_OUTPUT_TOKENS]
  redis.call('SET', R, record(RECORD_RESERVED, rec.expires, rec.input, rec.output, rec.pi,
                              rec.pc, rec.po, u_in, u_cached, u_out, rec.attempt,
                              #limits) .. rec.raw:sub(RECORD_SIZE + 1),
             'KEEPTTL')
  return settled_reply(rec, now, SETTLE_APPLIED, limits)
end
rec.state = (mode == MODE_COMMIT) and RECORD_COMMITTED or RECORD_RELEASED
-- a settled record only answers repeats: with the alerts its commit fired
local settled = record(rec.state, rec.expires, rec.input, rec.output, rec.pi, rec.pc, rec.po,
                       u_in, u_cached, u_out, rec.attempt, 0) .. rec.others
if fired and #fired > 0 then
  rec.alerts = table.concat(fired, ',')
  settled = settled .. RECORD_ALERTS_SEPARATOR .. rec.alerts
end
redis.call('SET', R, settled, 'PX', ms_text(kept_ms))
-- (a commit's `u` is what the reply reports; a release's reports no cost, as its `u`)
return settled_reply(rec, now, SETTLE_APPLIED, false, u, reserved)
