-- limits.lua: a subject's limits, whatever their algorithm: parsed from the engine's specs,
-- loaded from the subject hash, changed, written back, and reported. Each function here
-- dispatches to the algorithm's own file (sliding.lua, calendar.lua, bucket.lua); a new
-- algorithm adds a file and one branch to each.

-- Parsed spec blobs kept, at most; then the cache starts over
local MAX_PARSED_BLOBS = 256
-- Where the limits' fields start in what limits_of() lists: after K's `x`, `b` and `n`
-- (anomaly state, anomaly.lua). (`a`, the cost alerts fired, is read only when a budget
-- reaches a threshold: a field a hash lacks costs a scan of every field.)
local FIRST_LIMIT_FIELD = 4

-- Limits from a blob of specs (SPEC each). Each array is built with every entry a call sets
-- (no holes), so Lua sizes it once.
local function parse_specs(blob)
  local limits, pos, n, shadow = array8(), 1, #blob / SPEC_SIZE, false
  for k = 1, n do
    local lid, algo, metric, limit, a, b, c, d
    lid, algo, metric, limit, a, b, c, d, pos = sunpack(SPEC_FORMAT, blob, pos)
    if algo > ALG_SHADOW_FLAG then
      algo = algo - ALG_SHADOW_FLAG
      shadow = shadow or {}
      shadow[k] = true
    end
    if algo == ALG_SLIDING then
      limits[k] = sliding_parse(lid, algo, metric, limit, a, b)
    elseif algo == ALG_CALENDAR then
      limits[k] = calendar_parse(lid, algo, metric, limit, a, b, c, d)
    else
      limits[k] = bucket_parse(lid, algo, metric, limit, a, b)
    end
  end
  for k = n + 1, MAX_LIMITS do limits[k] = nil end
  return limits, shadow
end

-- The shadow limits (by index) of the blob limits_of() parsed last, or false: read by
-- reserve.lua and packed_reply (Redis runs one call at a time)
local SHADOW = false

-- Limits parsed from a spec blob, by blob, with the fields load_limits reads (K's `x`, `b` and `n`,
-- then each limit's state). Every call of one tier and subject kind sends the same blob (until a
-- calendar period ends), and a settle finds it in the reservation record, so a blob is parsed once.
-- Each call with the blob uses the same limit arrays (Redis runs one call at a time): each
-- algorithm's load resets every entry a call sets, so a call starts from the specs alone, as after
-- a fresh parse. Copying the arrays instead costs allocation and garbage (docs/performance.md).
local PARSED, nparsed = {}, 0
local function limits_of(blob)
  local parsed = PARSED[blob]
  if not parsed then
    if nparsed >= MAX_PARSED_BLOBS then PARSED, nparsed = {}, 0 end
    local limits, shadow = parse_specs(blob)
    local fields = {'x', 'b', 'n'}
    for k = 1, #limits do fields[k + FIRST_LIMIT_FIELD - 1] = limits[k][LID] end
    parsed = {limits, fields, shadow}
    PARSED[blob], nparsed = parsed, nparsed + 1
  end
  SHADOW = parsed[3]
  return parsed[1], parsed[2]
end

-- Whether the last load_limits() found no `b` or `n` field (Redis runs one call at a time). A
-- small hash finds a field by scanning from its first: a missing one costs a scan of them all,
-- on every call. So a hash's first write puts `x`, and `b` and `n` (empty: none), first.
local MISSING_B, MISSING_N = false, false

-- Reads every limit's state (one HMGET of `fields`, from limits_of(), and one more for windows
-- that moved on) and brings it to `now`, in memory (changed_fields() or charge_limits(), then
-- store_fields(), writes what changed). Sets USED of each limit; returns K's `x` (its expiry, 0
-- when unknown), then `b` (a block) and `n` (anomaly state), raw. `unused`: false, or by limit
-- index whether the call neither changes nor reports the limit's usage: such a limit is not
-- loaded at all. Returns, last, whether a calendar limit found Redis time outside the periods
-- the engine sent (its STALE).
local function load_limits(K, limits, fields, now, unused)
  local v = redis.call('HMGET', K, unpack(fields))
  local nexpired, stale = 0, false
  for k = 1, #limits do
    if not (unused and unused[k]) then
      local lim, raw = limits[k], v[k + FIRST_LIMIT_FIELD - 1]
      local algo = lim[ALGO]
      if algo == ALG_SLIDING then
        nexpired = sliding_load(lim, raw, now, nexpired)
      elseif algo == ALG_CALENDAR then
        calendar_load(lim, raw, now)
        if lim[STALE] then stale = true end
      else
        bucket_load(lim, raw, now)
      end
    end
  end
  if nexpired > 0 then
    local got = redis.call('HMGET', K, unpack(EXPIRED_FIELDS, 1, nexpired))
    local lims, counts = EXPIRED_LIMITS, EXPIRED_COUNTS
    for j = 1, nexpired do
      local count = tonumber(got[j]) or 0
      counts[j] = count
      if count ~= 0 then sliding_forget(lims[j], count) end
    end
  end
  local x = v[1]
  -- none yet, or not ours: K's expiry is set again
  x = (x and #x == DOUBLE_SIZE) and sunpack(DOUBLE_FORMAT, x) or 0
  MISSING_B, MISSING_N = not v[2], not v[3]
  return x, v[2], v[3], stale
end

-- Where a reserve's charge of each limit goes, for its record (settle needs nothing else): the
-- sub-bucket or period it charges (the loaded CUR or START that sliding_charge and
-- calendar_charge add to), 0 where the algorithm needs none. Written into `refs`.
local function charge_refs(limits, refs)
  for k = 1, #limits do
    local lim = limits[k]
    local algo = lim[ALGO]
    refs[k] = (algo == ALG_SLIDING and lim[CUR]) or (algo == ALG_CALENDAR and lim[START]) or 0
  end
  return refs
end

-- The HSET arguments of changed_fields and charge_limits, reused (read up to their count). The
-- limits' fields start after WRITE_HEAD_ROOM entries: room for a new hash's `x`, `b` and `n`,
-- which go first.
local WRITE_HEAD_ROOM = 6
local WRITE_ARGS = array16()

-- Writes the limits' fields in WRITE_ARGS (up to n) with one HSET, and `extra`: more
-- field/value pairs (alert marks, anomaly state, a block), or false; K then lives at least
-- `keep` ms more. Extends K's life when it must live `need` ms more.
local function store_fields(K, n, now, x, extra, keep, need)
  local out = WRITE_ARGS
  if extra then
    for j = 1, #extra do out[n + j] = extra[j] end
    n = n + #extra
    if keep > need then need = keep end
  end
  if n == WRITE_HEAD_ROOM then return end
  -- K lives `need` ms more, plus slack so a busy subject pays for a PEXPIRE only now and then.
  -- PEXPIRE takes whole ms, and `need` may be fractional (a sub-bucket width may be).
  if x < now + need then
    local first = x == 0
    x = ceil(now + need + need / EXPIRY_SLACK_DIVISOR) + MIN_KEY_TTL_MS
    if first then
      -- a new hash: `x`, `b` and `n` go first, where lookups find them at once (HSET sets its
      -- pairs in order), in the room before the limits' fields
      local from = WRITE_HEAD_ROOM + 1
      if MISSING_N then out[from - 2], out[from - 1], from = 'n', '', from - 2 end
      if MISSING_B then out[from - 2], out[from - 1], from = 'b', '', from - 2 end
      out[from - 2], out[from - 1], from = 'x', spack(DOUBLE_FORMAT, x), from - 2
      redis.call('HSET', K, unpack(out, from, n))
    else
      out[n + 1], out[n + 2] = 'x', spack(DOUBLE_FORMAT, x)
      redis.call('HSET', K, unpack(out, WRITE_HEAD_ROOM + 1, n + 2))
    end
    redis.call('PEXPIRE', K, int_text(x - now))  -- relative: a test clock need not agree with Redis
  else
    redis.call('HSET', K, unpack(out, WRITE_HEAD_ROOM + 1, n))
  end
end

-- Adds a settle's `deltas` to the limits (by limit index, may be negative; false: none), each
-- in the sub-bucket or period the reserve charged (`refs`, by limit index), and appends the
-- fields of those that changed to WRITE_ARGS. Returns their count, for store_fields, and how
-- long K must live for every limit loaded (`unused`: as load_limits'; what such a limit stores
-- lives as long as when it was written). A window that only moved on is not written: the next
-- load moves it again the same way.
local function changed_fields(K, limits, deltas, refs, unused, now)
  local out, need, n = WRITE_ARGS, MIN_KEY_TTL_MS, WRITE_HEAD_ROOM
  for k = 1, #limits do
    local lim = limits[k]
    local algo, delta, t = lim[ALGO], deltas and deltas[k] or 0, 0
    if unused and unused[k] then
      -- not loaded, and unchanged
    elseif algo == ALG_SLIDING then
      if delta ~= 0 and sliding_add(lim, delta, refs[k]) then
        n, t = sliding_fields(K, lim, out, n, now)
      else
        t = sliding_ttl(lim, now)
      end
    elseif algo == ALG_CALENDAR then
      if delta ~= 0 and calendar_add(lim, delta, refs[k]) then
        n, t = calendar_fields(lim, out, n, now)
      else
        t = calendar_ttl(lim, now)
      end
    else
      if delta ~= 0 and bucket_add(lim, delta) then n = bucket_fields(lim, out, n) end
      t = bucket_ttl(lim)
    end
    if t > need then need = t end
  end
  return n, need
end

-- The reply head: REPLY_HEAD_SIZE numbers (named by wire.py's REPLY_* or SETTLED_*), zero
-- until set; packed_reply appends the limits after them. One table serves every call (Redis
-- runs one call at a time, and a call builds one reply): a table per call costs its allocation
-- and its share of Lua's garbage collection.
local REPLY_HEAD = {0, 0, 0, 0, 0, 0, 0, 0, false, false, false, false, false, false, false,
                    false, false, false, false, false, false, false, false, false}
local function reply_head()
  local h = REPLY_HEAD
  h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8] = 0, 0, 0, 0, 0, 0, 0, 0
  return h
end

-- The reply of the head and limits in `out` (n numbers), `tail` and `alerts`, as packed_reply
-- makes it.
local function reply_of(out, n, tail, alerts)
  out[REPLY_ALERTS_AT] = tail and #tail or 0
  local reply = spack(longs(n + 1), n, unpack(out, 1, n))
  if tail then reply = reply .. tail end
  if alerts and #alerts > 0 then reply = reply .. '[' .. table.concat(alerts, ',') .. ']' end
  return reply
end

-- A reply: the head's numbers, then for every limit what remains (not below 0 unless `exact`
-- or a shadow limit)
-- and in how many ms it is back to full, as signed 64-bit integers; then `tail` (an opaque
-- string) when given, then the JSON array of `alerts` (alert JSONs, alerts.lua) when any.
local function packed_reply(limits, now, tail, out, alerts, exact)
  local n = REPLY_HEAD_SIZE
  for k = 1, limits and #limits or 0 do
    local lim = limits[k]
    local remaining, reset, algo = lim[CAP] - lim[USED], 0, lim[ALGO]
    if lim[METRIC] == METRIC_CONCURRENT then
      reset = 0  -- a slot frees when a call ends, which no clock can tell
    elseif algo == ALG_SLIDING then
      reset = sliding_reset(lim, now)
    elseif algo == ALG_CALENDAR then
      reset = calendar_reset(lim, now)
    else
      reset = bucket_reset(lim)
    end
    if remaining < 0 and not exact and not (SHADOW and SHADOW[k]) then remaining = 0 end
    out[n + 1], out[n + 2], n = remaining, reset, n + 2
  end
  return reply_of(out, n, tail, alerts)
end

-- A reserve's charge of `est` (by metric) to every limit, and its reply: packed_reply's, with
-- the head in `out` and no tail. Each limit is charged, written and reported by one call of its
-- algorithm (one pass over the limits instead of three: docs/performance.md); the fields go in
-- one HSET with `extra` (store_fields), unless `dry`.
local function charge_limits(K, limits, est, now, x, extra, keep, out, alerts, dry)
  local fields, need, n, r = not dry and WRITE_ARGS, MIN_KEY_TTL_MS, WRITE_HEAD_ROOM,
                             REPLY_HEAD_SIZE
  for k = 1, #limits do
    local lim = limits[k]
    local algo, metric, t, remaining, reset = lim[ALGO], lim[METRIC], 0, 0, 0
    if algo == ALG_SLIDING then
      n, t, remaining, reset = sliding_charge(K, lim, est[metric], fields, n, now)
    elseif algo == ALG_CALENDAR then
      n, t, remaining, reset = calendar_charge(lim, est[metric], fields, n, now)
    else
      n, t, remaining, reset = bucket_charge(lim, est[metric], fields, n)
    end
    if t > need then need = t end
    -- reported as packed_reply reports a limit
    if remaining < 0 and not (SHADOW and SHADOW[k]) then remaining = 0 end
    if metric == METRIC_CONCURRENT then reset = 0 end
    out[r + 1], out[r + 2], r = remaining, reset, r + 2
  end
  if not dry then store_fields(K, n, now, x, extra, keep, need) end
  return reply_of(out, r, false, alerts)
end

-- Milliseconds until `need` more units fit in a loaded limit; -1 when they never can.
local function retry_after(K, lim, need, now)
  if need > lim[CAP] then return -1 end
  local algo = lim[ALGO]
  if algo == ALG_CALENDAR then return calendar_retry(lim, now) end
  if algo == ALG_TOKEN_BUCKET then return bucket_retry(lim, need) end
  return sliding_retry(K, lim, need, now)
end
