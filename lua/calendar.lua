-- calendar.lua: a budget per calendar period (day, month) of the configured timezone.
--
-- State in the subject hash K:  lid = PAIR(start of the period the value belongs to, value).
-- Lua has no timezone database, so the engine sends the starts of the previous, current and
-- next two periods (by the daemon's clock) and the call picks the one Redis time falls in.

-- The entries of a loaded calendar budget, after core.lua's: the four period starts, then the
-- current period and whether Redis time is outside all of them
local P0, P1, P2, P3, START, STOP, STALE = 6, 7, 8, 9, 10, 11, 12

-- spec parameters: the four period starts (ms)
local function calendar_parse(lid, algo, metric, limit, a, b, c, d)
  -- LID, ALGO, METRIC, CAP, USED, P0, P1, P2, P3, START, STOP, STALE
  return {lid, algo, metric, limit, 0, a, b, c, d, 0, 0, false}
end

-- The period a time falls in among the four starts: its start and stop, or false.
local function period_of(lim, t)
  if lim[P0] <= t and t < lim[P1] then return lim[P0], lim[P1] end
  if lim[P1] <= t and t < lim[P2] then return lim[P1], lim[P2] end
  if lim[P2] <= t and t < lim[P3] then return lim[P2], lim[P3] end
  return false
end

local function calendar_load(lim, raw, now)
  lim[STALE], lim[USED] = false, 0
  local start, stop = period_of(lim, now)
  if not start then lim[STALE], start, stop = true, now, now + 1 end
  if raw then
    local stored, value = sunpack(PAIR_FORMAT, raw)
    if stored == start then
      lim[USED] = value
    elseif stored > start then
      -- Redis time stepped back (a failover to a skewed replica, NTP): a newer period is
      -- stored; keep counting in it, never replace it with an older one
      local newer_start, newer_stop = period_of(lim, stored)
      if newer_start ~= stored then
        -- beyond the periods the engine sent: as long as the last one, to be safe
        newer_start, newer_stop = stored, stored + (lim[P3] - lim[P2])
      end
      start, stop, lim[STALE], lim[USED] = newer_start, newer_stop, false, value
    end
  end
  lim[START], lim[STOP] = start, stop
end

-- Adds delta to the period `ref` (false: the current one). A refund for a period that is over
-- is dropped; an overrun for one is charged to the current one, in full.
local function calendar_add(lim, delta, ref)
  if lim[STALE] then return false end
  local start = lim[START]
  if ref and ref ~= start and (delta < 0 or ref > start) then return false end
  lim[USED] = max(0, lim[USED] + delta)
  return true
end

-- (returns the new n, and calendar_ttl's)
local function calendar_fields(lim, out, n, now)
  out[n + 1], out[n + 2] = lim[LID], spack(PAIR_FORMAT, lim[START], lim[USED])
  return n + 2, lim[STOP] - now
end

-- A reserve's charge: calendar_add(lim, amount, false) and calendar_fields, inline (a Lua call
-- costs more), to the current period START (which charge_refs records for settle), with its
-- field appended to out (no `out`: a dry run). Returns the new n, calendar_ttl's, what remains
-- and calendar_reset's (see sliding_charge).
local function calendar_charge(lim, amount, out, n, now)
  local left, used = lim[STOP] - now, lim[USED]
  if not lim[STALE] then
    used = max(0, used + amount)
    lim[USED] = used
    if out then
      out[n + 1], out[n + 2], n = lim[LID], spack(PAIR_FORMAT, lim[START], used), n + 2
    end
  end
  return n, left, lim[CAP] - used, left
end

local function calendar_ttl(lim, now)
  return lim[STOP] - now
end

local function calendar_reset(lim, now)
  return lim[STOP] - now
end

local function calendar_retry(lim, now)
  return lim[STOP] - now
end
