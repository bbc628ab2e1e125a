-- alerts.lua: alerts decided inside the quota calls, and their record.
--
-- An alert is pushed to the subject's own capped list `rl:{<tag>}:alerts` (a KEYS entry of the
-- call, in the subject's hash slot) in the call that decides it, so it exists exactly once,
-- and the call returns it (the JSON array of its field/value strings) for the daemon to answer
-- and forward to the webhook outbox (ratelimitd/alerts/). The fields, and the alert id, are
-- those of ratelimitd/quota/alert_record.py; a cost alert's `limit` is the limit's lid here (the
-- daemon names it from its configuration).
--
-- Cost thresholds (settle, on commit): each cost budget (metric cost_usd) of the subject fires
-- each threshold once per period. The period of a calendar budget is its calendar period; of
-- a sliding window or a token bucket, the window-aligned epoch floor(now / window) * window
-- (a rolling window has no period of its own: this one restarts the thresholds once per window
-- length). K's field `a` holds ALERT_MARK per budget that fired: its lid, the period, and a
-- bit per threshold (in the order the thresholds are sent, ascending). A mark of a newer
-- period (Redis time stepped back) is kept, and fires nothing meanwhile.

-- Severities of a threshold, as alert_record.py's severity_for: from 1.0 `limit`, from 0.8
-- `critical`
local LIMIT_PPM, CRITICAL_PPM = 1000000, 800000

-- Integers as text: Lua's own number formatting keeps 14 digits; a budget has up to 17.
local function alert_int(v)
  return string.format('%d', v)
end

-- The subject of K (`rl:{<tag>}`): its tag, scope and id (the tag unescaped as
-- policy.Subject.tag escapes it).
local function subject_of(K)
  local tag = K:sub(5, -2)
  local scope, safe = tag:match('^([^:]*):(.*)$')
  local sid = safe:gsub('%%7B', '{'):gsub('%%7D', '}'):gsub('%%25', '%%')
  return tag, scope, sid
end

-- Pushes one alert to the subject's list AK and returns its JSON (alert_record.py's fields).
local function emit_alert(K, AK, now, kind, severity, limit, ppm, spend, budget, observed,
                          baseline, period_start)
  local tag, scope, sid = subject_of(K)
  local id = 'alt_' .. redis.sha1hex(kind .. '\n' .. tag .. '\n' .. limit .. '\n'
                                     .. alert_int(period_start) .. '\n' .. alert_int(ppm)):sub(1, 24)
  local encoded = cjson.encode({'v', '1', 'id', id, 'kind', kind, 'severity', severity,
                                'scope', scope, 'sid', sid, 'limit', limit,
                                'threshold_ppm', alert_int(ppm), 'spend_nano', alert_int(spend),
                                'budget_nano', alert_int(budget), 'observed', alert_int(observed),
                                'baseline', alert_int(baseline),
                                'period_start_ms', alert_int(period_start),
                                'created_ms', alert_int(now)})
  redis.call('LPUSH', AK, encoded)
  redis.call('LTRIM', AK, 0, ALERT_LIST_MAX_LEN - 1)
  redis.call('PEXPIRE', AK, ALERT_LIST_TTL_MS)
  return encoded
end

local function cost_severity(ppm)
  if ppm >= LIMIT_PPM then return 'limit' end
  if ppm >= CRITICAL_PPM then return 'critical' end
  return 'warning'
end

-- The period a budget's thresholds fire once in (see above).
local function alert_period(lim, now)
  local algo = lim[ALGO]
  if algo == ALG_CALENDAR then return lim[START] end
  local window = lim[WINDOW]
  if algo == ALG_SLIDING then window = floor(lim[N] * lim[WIDTH] + 0.5) end
  return floor(now / window) * window
end

local function parse_marks(raw)
  local marks = {}
  if raw then
    for pos = 1, #raw - ALERT_MARK_SIZE + 1, ALERT_MARK_SIZE do
      local lid, period, fired = sunpack(ALERT_MARK_FORMAT, raw, pos)
      marks[#marks + 1] = {lid, period, fired}
    end
  end
  return marks
end

-- Fires every threshold (ppm doubles, ascending, in `args` from `at` on; the lowest is
-- `lowest`) that a loaded cost budget's spend has reached and that has not fired in its
-- period. Reads K's `a` only then. Returns the new `a` and the alerts' JSONs, or false when
-- nothing fired.
local function cost_alerts(K, AK, now, limits, lowest, args, at)
  local marks, changed, fired = false, false, false
  local nt = (#args - at + 1) / DOUBLE_SIZE
  local ppms
  for k = 1, #limits do
    local lim = limits[k]
    -- most commits leave every budget below the lowest threshold: nothing more to read
    if lim[METRIC] == METRIC_COST_USD and lim[USED] * PPM >= lowest * lim[CAP] then
      marks = marks or parse_marks(redis.call('HGET', K, 'a'))
      ppms = ppms or {sunpack(doubles(nt), args, at)}
      local lid, period, mark = lim[LID], alert_period(lim, now), nil
      for j = 1, #marks do
        if marks[j][1] == lid then mark = marks[j] end
      end
      if not mark then
        mark = {lid, period, 0}
        marks[#marks + 1] = mark
      elseif mark[2] < period then
        mark[2], mark[3] = period, 0
      end
      if mark[2] == period then
        local spend, cap, bits = lim[USED], lim[CAP], mark[3]
        local bit = 1
        for i = 1, nt do
          if bits % (2 * bit) < bit and spend * PPM >= ppms[i] * cap then
            bits = bits + bit
            fired = fired or {}
            fired[#fired + 1] = emit_alert(K, AK, now, 'cost_threshold', cost_severity(ppms[i]),
                                           lid, ppms[i], spend, cap, 0, 0, period)
          end
          bit = bit * 2
        end
        if bits ~= mark[3] then mark[3], changed = bits, true end
      end
    end
  end
  if not changed then return false end
  local parts = {}
  for j = 1, #marks do parts[j] = spack(ALERT_MARK_FORMAT, unpack(marks[j])) end
  return table.concat(parts), fired
end
