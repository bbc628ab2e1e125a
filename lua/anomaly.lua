-- anomaly.lua: unusual use of one subject, noticed inside its reserve (the primary subject of
-- a reserve only, and only when the engine sends ANOMALY_ARGS: tiers with `anomaly = false`
-- send none). It adds no call: the state is K's field `n`, read by the same HMGET as the
-- limits and written by the same HSET.
--
-- `n` = ANOMALY_STATE: the current hour (its index), the reserves it admitted, the commits it
-- saw and their tokens (settle adds them), the two baselines, the active hours they have
-- seen, and a bit per anomaly that alerted this hour. When an hour is over, its requests and
-- its tokens per committed request become samples of the baselines: a moving average that
-- weighs each active hour 1/BASELINE_WEIGHT, with a sample counted at most BASELINE_CLIP
-- times the baseline, so the baseline follows slow growth (at most +12.5 % an active hour)
-- and one burst barely moves it. Idle hours are no samples. A new subject starts at the
-- configured defaults; until it has BASELINE_MIN_HOURS active hours, its baseline is never
-- below them.
--
-- Checked at reserve, and only once the subject has min_history_hours active hours (before,
-- its baseline would be the defaults, not its own use: no spike decision at all). The reserve
-- that would make the hour's admitted requests exceed request_factor x the baseline is a
-- request_spike: with request_spike_blocks (the action "block") the subject is blocked for
-- block_ms (field `b`, as ratelimitd/abuse/blocks.py writes it, reason "request_spike") and
-- the call answers BLOCKED, checked before the limits; else (the action "alert") the call, once
-- admitted, alerts. A commit-fed average of tokens per request this hour (once it has
-- TOKEN_MIN_SAMPLES commits) above token_factor x its baseline is a token_spike: an alert, no
-- block. Each alerts once per subject and hour (the alerts' period is the hour's start).

local HOUR_MS = 3600000
local BASELINE_WEIGHT, BASELINE_CLIP, BASELINE_MIN_HOURS, TOKEN_MIN_SAMPLES = 8, 2, 24, 3
-- hours_seen is one byte: it counts on only as far as this
local MAX_HOURS_SEEN = 255
-- K outlives its last reserve this long when it holds a baseline: a subject back after a
-- few idle days keeps its history
local ANOMALY_KEEP_MS = 691200000
-- ANOMALY_STATE's entries, and the bits of its last one
local A_HOUR, A_REQUESTS, A_COMMITS, A_TOKENS, A_BASE_REQUESTS, A_BASE_TOKENS = 1, 2, 3, 4, 5, 6
local A_HOURS, A_ALERTED = 7, 8
local REQUEST_SPIKE_BIT, TOKEN_SPIKE_BIT = 1, 2

local function moved_average(baseline, sample)
  return baseline + (min(sample, BASELINE_CLIP * baseline) - baseline) / BASELINE_WEIGHT
end

-- The state of the call's subject, one table for every call (Redis runs one at a time)
local ANOMALY = {0, 0, 0, 0, 0, 0, 0, 0}

-- The state at `now` from `raw` (K's `n`; a new one from the defaults when absent), with an
-- hour that is over folded into the baselines; false when absent and no defaults are given.
local function anomaly_state(raw, now, default_requests, default_tokens)
  local hour = floor(now / HOUR_MS)
  local st = ANOMALY
  if raw and #raw == ANOMALY_STATE_SIZE then
    st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8] = sunpack(ANOMALY_STATE_FORMAT, raw)
  elseif default_requests then
    st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8] =
      hour, 0, 0, 0, default_requests, default_tokens, 0, 0
  else
    return false
  end
  if st[A_HOUR] < hour then   -- (an hour ahead of `now`: Redis time stepped back; keep it)
    if st[A_REQUESTS] > 0 then
      st[A_BASE_REQUESTS] = moved_average(st[A_BASE_REQUESTS], st[A_REQUESTS])
      st[A_HOURS] = min(st[A_HOURS] + 1, MAX_HOURS_SEEN)
    end
    if st[A_COMMITS] > 0 then
      st[A_BASE_TOKENS] = moved_average(st[A_BASE_TOKENS], st[A_TOKENS] / st[A_COMMITS])
    end
    st[A_HOUR], st[A_REQUESTS], st[A_COMMITS], st[A_TOKENS], st[A_ALERTED] = hour, 0, 0, 0, 0
  end
  return st
end

-- store_fields' extra field of a reserve: the anomaly state (its value set per call)
local ANOMALY_FIELD = {'n', false}

local function pack_anomaly(st)
  return spack(ANOMALY_STATE_FORMAT, unpack(st, 1, A_ALERTED))
end

local function baseline_of(learned, default, st)
  if st[A_HOURS] < BASELINE_MIN_HOURS and learned < default then return default end
  return learned
end

-- Whether the anomaly `bit` has alerted this hour; marks it when not.
local function first_this_hour(st, bit)
  if st[A_ALERTED] % (2 * bit) >= bit then return false end
  st[A_ALERTED] = st[A_ALERTED] + bit
  return true
end

-- Reserve: would admitting one more request this hour be a request spike? Returns the
-- alert's JSON (false when it already alerted this hour) when it would, else nil.
local function request_spike(K, AK, now, st, factor_ppm, default_requests)
  local base = baseline_of(st[A_BASE_REQUESTS], default_requests, st)
  local observed = st[A_REQUESTS] + 1
  if observed * PPM <= factor_ppm * base then return nil end
  if not first_this_hour(st, REQUEST_SPIKE_BIT) then return false end
  return emit_alert(K, AK, now, 'request_spike', 'high', '', factor_ppm, 0, 0, observed,
                    floor(base + 0.5), st[A_HOUR] * HOUR_MS)
end

-- Reserve, admitted: counts the request. When the subject has the history to judge by
-- (`decides`), a request spike alerts if request_factor is given (the action "alert"), and a
-- token spike alerts. Returns the alerts' JSON (an array), or false.
local function count_request(K, AK, now, st, decides, request_factor, default_requests,
                             token_factor, default_tokens)
  local fired = false
  if decides and request_factor then
    local spike = request_spike(K, AK, now, st, request_factor, default_requests)
    if spike then fired = {spike} end
  end
  st[A_REQUESTS] = st[A_REQUESTS] + 1
  local commits = st[A_COMMITS]
  if not decides or commits < TOKEN_MIN_SAMPLES then return fired end
  local base = baseline_of(st[A_BASE_TOKENS], default_tokens, st)
  if st[A_TOKENS] * PPM <= token_factor * base * commits then return fired end
  if not first_this_hour(st, TOKEN_SPIKE_BIT) then return fired end
  fired = fired or {}
  fired[#fired + 1] = emit_alert(K, AK, now, 'token_spike', 'medium', '', token_factor, 0, 0,
                                 floor(st[A_TOKENS] / commits + 0.5), floor(base + 0.5),
                                 st[A_HOUR] * HOUR_MS)
  return fired
end

-- Settle, commit: the call's tokens count in the hour's average.
local function count_commit(st, tokens)
  st[A_COMMITS], st[A_TOKENS] = st[A_COMMITS] + 1, st[A_TOKENS] + tokens
end
