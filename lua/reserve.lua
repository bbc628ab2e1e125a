-- reserve.lua: checks and reserves one call's estimated usage on every limit of one subject
-- (one hash slot), all or nothing, granting the largest output cap that every limit allows.
--
-- KEYS: 1 subject hash K, 2 reservation record R, 3 the subject's alert list (alerts.lua)
-- ARGV: 1 RESERVE_ARGS (wire.py): clock override (0 = Redis TIME), mode, reservation ttl ms,
--         input tokens, requested output cap, minimum output, input, cached-input and output
--         prices (micro-USD per 1M tokens), the attempt, how long the record lives (the ttl
--         plus the commit grace, ms), where the other subjects start; then ANOMALY_ARGS, or
--         nothing (no anomaly check: anomaly.lua); then the reservation's other subjects
--         (opaque, kept in the record),
--       2 the limit specs (SPEC each)
--   MODE_RETRY: an idempotent retry; a live record of the same id answers instead, when it
--   is of the same request (the same other subjects and input tokens), else RESERVE_REUSED.
--   MODE_CONFIRM: answers whether a live record of the id is here; charges nothing.
--   MODE_CHECK: answers only whether the subject is blocked (block.lua); charges nothing.
--   MODE_PEEK: answers RESERVE_PEEKED, every limit as loaded (remaining not clamped at 0), the
--   block's ms left as retry_after_ms and its reason as the tail; charges nothing.
--   A blocked subject answers RESERVE_BLOCKED, with the block's reason as the reply's tail.
--   MODE_ADOPT: as MODE_CONFIRM, and a live record becomes this attempt's.
--   A record of this very attempt (left by a cancel that ran first) answers RESERVE_CANCELLED.
-- Reply (packed_reply): wire.py's RESERVE_REPLY fields, then per limit: remaining, reset ms;
-- then the tail, then the alerts the call fired (an anomaly's).

local K, R, AK = KEYS[1], KEYS[2], KEYS[3]
local args = ARGV[1]
local clock, mode, ttl, input, cap, min_out, pi, pc, po, attempt, record_ttl, others_at =
  sunpack(RESERVE_ARGS_FORMAT, args)
local now = now_ms(clock)
local limits, fields = limits_of(ARGV[2])
local nl = #limits
local x, block, anomaly_raw, stale = load_limits(K, limits, fields, now)
if stale then
  return redis.error_reply('ERR calendar boundaries do not cover Redis time')
end
local head = reply_head()
head[REPLY_INPUT_TOKENS] = input

if mode == MODE_PEEK then
  local ends, reason = block_of(block, now)
  head[REPLY_STATUS] = RESERVE_PEEKED
  if ends then head[REPLY_RETRY_AFTER_MS] = ceil(ends - now) end
  return packed_reply(limits, now, reason or '', head, false, true)
end

if mode ~= MODE_CONFIRM and mode ~= MODE_ADOPT then
  local ends, reason = block_of(block, now)
  if ends then
    head[REPLY_STATUS], head[REPLY_RETRY_AFTER_MS] = RESERVE_BLOCKED, ceil(ends - now)
    return packed_reply(limits, now, reason, head)
  end
  if mode == MODE_CHECK then
    head[REPLY_STATUS] = RESERVE_DRY_RUN
    return packed_reply(limits, now, false, head)
  end
end

-- A plain reserve's record is new (its id is random): it is written with NX below instead of
-- read here, which finds a cancel that ran first at no extra command.
if mode ~= MODE_DRY_RUN and mode ~= MODE_RESERVE then
  local prev = redis.call('GET', R)
  local rec = prev and parse_record(prev)
  if rec and rec.attempt == attempt then
    head[REPLY_STATUS] = RESERVE_CANCELLED
    return packed_reply(limits, now, false, head)
  end
  local live = rec and rec.state ~= RECORD_RELEASED and rec.expires > now
  if live and mode == MODE_RETRY
     and (rec.others ~= args:sub(others_at) or rec.input ~= input) then
    -- the key's first reserve was another request (other subjects, other input): no retry
    -- of this one can ever be answered with it
    head[REPLY_STATUS] = RESERVE_REUSED
    return packed_reply(limits, now, false, head)
  end
  if live and mode == MODE_ADOPT then
    -- the retry answers with this reservation: it becomes the retry's attempt, so a cancel
    -- of the first attempt (which failed, or may yet) leaves it alone
    redis.call('SET', R, record_of_attempt(prev, attempt), 'KEEPTTL')
  end
  if live and mode ~= MODE_RESERVE then
    head[REPLY_STATUS], head[REPLY_GRANTED_OUTPUT] = RESERVE_REPEAT, rec.output
    head[REPLY_EXPIRES_AT_MS], head[REPLY_INPUT_TOKENS] = rec.expires, rec.input
    head[REPLY_RESERVED_COST_NANO] = ceil((rec.input * pi + rec.output * po) / PRICE_DIVISOR)
    return packed_reply(limits, now, false, head)
  end
  if mode == MODE_CONFIRM or mode == MODE_ADOPT then
    head[REPLY_STATUS] = RESERVE_MISSING
    return packed_reply(limits, now, false, head)
  end
end

-- Anomalies (anomaly.lua), once the subject has the history to judge by: with the action
-- "block", a request spike blocks the subject now, in this call; with "alert", the call alerts
-- once it is admitted (below).
local st, decides, spike_blocks = false, false, false
local request_factor, token_factor, default_requests, default_tokens
local fired = false
if others_at > RESERVE_ARGS_SIZE + 1 and mode ~= MODE_DRY_RUN then
  local block_ms, blocks, min_hours
  request_factor, token_factor, block_ms, default_requests, default_tokens, blocks, min_hours =
    sunpack(ANOMALY_ARGS_FORMAT, args, RESERVE_ARGS_SIZE + 1)
  st = anomaly_state(anomaly_raw, now, default_requests, default_tokens)
  decides, spike_blocks = st[A_HOURS] >= min_hours, blocks == 1
  local spike
  if decides and spike_blocks then
    spike = request_spike(K, AK, now, st, request_factor, default_requests)
  end
  if spike ~= nil then
    local ends = now + block_ms
    local n, need = changed_fields(K, limits, false, false, false, now)
    store_fields(K, n, now, x, {'n', pack_anomaly(st),
                                'b', spack(DOUBLE_FORMAT, ends) .. 'request_spike'},
                 max(ANOMALY_KEEP_MS, block_ms + MIN_KEY_TTL_MS), need)
    head[REPLY_STATUS], head[REPLY_RETRY_AFTER_MS] = RESERVE_BLOCKED, block_ms
    return packed_reply(limits, now, 'request_spike', head, spike and {spike})
  end
end

-- The largest output every limit still allows; a limit that cannot fit the minimum denies.
local est = amounts(RESERVED_AMOUNTS, 1, input, 0, 0, pi, pi, po, 1)
local fixed = input * pi
local floor_out = min(min_out, cap)
local grant, denied = cap, nil
for k = 1, nl do
  local lim = limits[k]
  local room, m = lim[CAP] - lim[USED], lim[METRIC]
  local max_out
  if m == METRIC_TOKENS then
    max_out = room - input
  elseif m == METRIC_OUTPUT_TOKENS then
    max_out = room
  elseif m == METRIC_COST_USD and po > 0 then
    max_out = floor((room * PRICE_DIVISOR - fixed) / po)
  else
    max_out = (est[m] <= room) and cap or -1
  end
  if SHADOW and SHADOW[k] then
    max_out = grant  -- charged and reported, never denies nor caps the grant
  end
  if max_out < floor_out then
    denied = denied or {}
    denied[#denied + 1] = k
  elseif max_out < grant then
    grant = max_out
  end
end

if denied then
  -- A concurrency slot frees when a call in flight is committed or released, which no one can
  -- foresee, and at the latest when its reservation expires, at most one sub-bucket (ttl / 60)
  -- late: that latest moment is the hint (a client may retry sooner once one of its calls ends)
  local concurrent_retry_ms = ttl + math.floor(ttl / 60)
  est = amounts(RESERVED_AMOUNTS, 1, input, 0, floor_out, pi, pi, po, 1)
  local retry = 0
  for _, k in ipairs(denied) do
    local lim = limits[k]
    local r = retry_after(K, lim, est[lim[METRIC]], now)
    if lim[METRIC] == METRIC_CONCURRENT and r >= 0 then r = concurrent_retry_ms end
    if r < 0 or retry < 0 then retry = -1 elseif r > retry then retry = r end
  end
  head[REPLY_STATUS], head[REPLY_DENIED_LIMIT], head[REPLY_RETRY_AFTER_MS] =
    RESERVE_DENIED, denied[1], retry
  return packed_reply(limits, now, false, head)
end

-- the estimate with the grant as its output (as amounts() would give it)
est[METRIC_TOKENS], est[METRIC_OUTPUT_TOKENS] = input + grant, grant
est[METRIC_COST_USD] = ceil((fixed + grant * po) / PRICE_DIVISOR)
local expires = now + ttl
local extra = false
if mode ~= MODE_DRY_RUN then
  -- the record keeps where each limit is charged (sub-bucket, period): settle needs no more
  local refs = charge_refs(limits, RESERVE_REFS)
  local head_and_refs = spack(record_format(nl), RECORD_RESERVED, expires, input, grant, pi, pc,
                              po, 0, 0, 0, attempt, nl, unpack(refs, 1, nl))
  local written
  local value = head_and_refs .. ARGV[2] .. args:sub(others_at)
  if mode == MODE_RESERVE then
    written = redis.call('SET', R, value, 'PX', ms_text(record_ttl), 'NX')
  else
    written = redis.call('SET', R, value, 'PX', ms_text(record_ttl))
  end
  if not written then
    -- a record of this id exists: the cancel of this very attempt ran first
    head[REPLY_STATUS] = RESERVE_CANCELLED
    return packed_reply(limits, now, false, head)
  end
  if st then
    fired = count_request(K, AK, now, st, decides, not spike_blocks and request_factor,
                          default_requests, token_factor, default_tokens)
    extra = ANOMALY_FIELD
    extra[2] = pack_anomaly(st)
  end
end
head[REPLY_STATUS] = mode == MODE_DRY_RUN and RESERVE_DRY_RUN or RESERVE_RESERVED
head[REPLY_GRANTED_OUTPUT], head[REPLY_EXPIRES_AT_MS] = grant, expires
head[REPLY_RESERVED_COST_NANO] = est[METRIC_COST_USD]
-- charged, written (but in a dry run) and reported at once
return charge_limits(K, limits, est, now, x, extra, ANOMALY_KEEP_MS, head, fired,
                     mode == MODE_DRY_RUN)
