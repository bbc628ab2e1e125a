-- bucket.lua: the token bucket, refilled in whole units by Redis time.
--
-- State in the subject hash K:  lid = PAIR(level (below 0 after an overrun), last refill time).

-- The entries of a loaded token bucket, after core.lua's: refill per window, window ms,
-- burst, level, last refill, and the time it is counted at (Redis time, or its last refill
-- when that is ahead: time stepped back)
local RATE, WINDOW, BURST, LEVEL, TS, AT = 6, 7, 8, 9, 10, 11

-- spec parameters: a = window ms, b = burst; the limit is the refill per window
local function bucket_parse(lid, algo, metric, limit, a, b)
  -- LID, ALGO, METRIC, CAP, USED, RATE, WINDOW, BURST, LEVEL, TS, AT
  return {lid, algo, metric, b, 0, limit, a, b, 0, 0, 0}
end

local function bucket_load(lim, raw, now)
  local window, burst, rate = lim[WINDOW], lim[BURST], lim[RATE]
  local level, ts = burst, now
  if raw then level, ts = sunpack(PAIR_FORMAT, raw) end
  -- Redis time stepped back (a failover, NTP): the refill clock stays where it was (moving it
  -- back would refill that time twice once Redis time is back); nothing refills meanwhile
  if ts > now then now = ts end
  if level < burst then
    local add = floor((now - ts) * rate / window)
    if add > 0 then
      level = level + add
      -- the refill clock moves only by the time those whole units took: never generous
      ts = ts + ceil(add * window / rate)
    end
  end
  if level >= burst then level, ts = burst, now end
  lim[LEVEL], lim[TS], lim[USED], lim[AT] = level, ts, burst - level, now
end

local function bucket_add(lim, delta)
  local level = lim[LEVEL] - delta
  if level >= lim[BURST] then
    -- full now (a refund): it refills from now on, as a full bucket loaded now would; its
    -- refill clock must not stay behind, or time stepping back would refill that lag again
    level, lim[TS] = lim[BURST], lim[AT]
  end
  lim[LEVEL], lim[USED] = level, lim[BURST] - level
  return true
end

local function bucket_fields(lim, out, n)
  out[n + 1], out[n + 2] = lim[LID], spack(PAIR_FORMAT, lim[LEVEL], lim[TS])
  return n + 2
end

-- How long until the bucket is full again (then its state can go)
local function bucket_ttl(lim)
  return ceil((lim[BURST] - lim[LEVEL]) * lim[WINDOW] / lim[RATE])
end

local function bucket_reset(lim)
  if lim[LEVEL] >= lim[BURST] then return 0 end
  return bucket_ttl(lim)
end

-- A reserve's charge: bucket_add(lim, amount), with its field appended to out (no `out`: a
-- dry run). Returns the new n, bucket_ttl's, what remains and bucket_reset's (see
-- sliding_charge).
local function bucket_charge(lim, amount, out, n)
  bucket_add(lim, amount)
  if out then n = bucket_fields(lim, out, n) end
  return n, bucket_ttl(lim), lim[CAP] - lim[USED], bucket_reset(lim)
end

-- (the time since the last refill already counts towards the next unit)
local function bucket_retry(lim, need)
  local wait = (need - lim[LEVEL]) * lim[WINDOW] / lim[RATE] - (lim[AT] - lim[TS])
  return max(1, ceil(wait))
end
