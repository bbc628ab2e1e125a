-- sliding.lua: the sliding window, kept as N sub-buckets plus a running total.
--
-- State in the subject hash K:
--   lid     = SLIDING_STATE(newest sub-bucket index, running total, the newest sub-bucket's count)
--   lid:<i> = the count of an older sub-bucket b with b mod (N+1) = i.
-- N+1 cells make the counted span cover the whole window plus at most one sub-bucket:
-- conservative by <= 1/N of the window, never generous. A sub-bucket may be a fraction of a
-- ms wide (a 90 ms window has 60 of 1.5 ms): times that reach Redis are rounded up to whole ms.
-- In-flight reservations (metric concurrent) are a sliding window as long as the reservation
-- TTL: a reserve adds 1 to the current sub-bucket, its commit or release takes it back, and an
-- abandoned one slides out after the TTL (plus at most one sub-bucket), so a crashed gateway
-- cannot leak slots.

-- The entries of a loaded sliding window, after core.lua's: sub-buckets, sub-bucket ms,
-- current and newest-stored sub-bucket, running total, current count; after a move: whether
-- it moved, the old newest count, whether the window was idle for a whole window, and deltas
-- for older sub-buckets; then the names of the cells' fields (made as first needed), and where
-- the cells that slid out are listed in EXPIRED_FIELDS (false: not read)
local N, WIDTH, CUR, HEAD, TOTAL = 6, 7, 8, 9, 10
local CELL, MOVED, PREV, IDLE, INCR, CELLS, EXPIRED_AT = 11, 12, 13, 14, 15, 16, 17

-- spec parameters: a = window ms, b = sub-buckets
local function sliding_parse(lid, algo, metric, limit, a, b)
  -- LID, ALGO, METRIC, CAP, USED, N, WIDTH, CUR, HEAD, TOTAL, CELL, MOVED, PREV,
  -- IDLE, INCR, CELLS, EXPIRED_AT
  return {lid, algo, metric, limit, 0, b, a / b, 0, 0, 0, 0, false, 0, false,
          false, {}, false}
end

-- The field of an older sub-bucket. Its name is made once per parsed limit: a number
-- concatenated to a string is formatted with printf, slowly. (Loops look a name up in
-- lim[CELLS], at bucket % (N+1) + 1, before they call this: a Lua call costs more.)
local function cell_field(lim, bucket)
  local i = bucket % (lim[N] + 1)
  local cells = lim[CELLS]
  local f = cells[i + 1]
  if not f then
    f = lim[LID] .. ':' .. i
    cells[i + 1] = f
  end
  return f
end

-- The cells that slid out of the windows a call loads, their limits, and what they held
-- (once read), from 1 to the count sliding_load returns: one set of tables for every call
-- (Redis runs one call at a time)
local EXPIRED_FIELDS, EXPIRED_LIMITS, EXPIRED_COUNTS = array16(), array16(), array16()

-- Brings the window to `now`, in memory. When it moved on, the sub-buckets head+1 .. cur
-- reuse cells of sub-buckets that slid out: they are listed in EXPIRED_FIELDS and
-- EXPIRED_LIMITS after the `nexpired` listed already (read by the caller, then given to
-- sliding_forget), and the newest count leaves SLIDING_STATE for its own field (written by
-- sliding_fields). Returns the new count of listed cells.
local function sliding_load(lim, raw, now, nexpired)
  lim[INCR] = false
  local n, cur = lim[N], floor(now / lim[WIDTH])
  local head, total, cell = cur, 0, 0
  if raw then head, total, cell = sunpack(SLIDING_STATE_FORMAT, raw) end
  -- Redis time stepped back (a failover): keep counting in the newer sub-bucket
  if head > cur then cur = head end
  if cur > head then
    -- (PREV, IDLE and EXPIRED_AT are read only after a move: set only then)
    lim[MOVED], lim[PREV], lim[IDLE], lim[EXPIRED_AT] = true, cell, false, false
    if cur - head > n then
      total, lim[IDLE] = 0, true          -- idle for a whole window: every cell is stale
    else
      local fields, lims, cells, m = EXPIRED_FIELDS, EXPIRED_LIMITS, lim[CELLS], n + 1
      lim[EXPIRED_AT] = nexpired + 1
      for b = head + 1, cur do
        nexpired = nexpired + 1
        fields[nexpired], lims[nexpired] = cells[b % m + 1] or cell_field(lim, b), lim
      end
    end
    cell = 0
  else
    lim[MOVED] = false
  end
  lim[CUR], lim[HEAD], lim[TOTAL], lim[CELL], lim[USED] = cur, head, total, cell, total
  return nexpired
end

-- A cell that slid out held `count`: it no longer counts.
local function sliding_forget(lim, count)
  lim[TOTAL] = lim[TOTAL] - count
  lim[USED] = lim[TOTAL]
end

-- Adds delta to the sub-bucket `ref` (false: the current one). A refund for a sub-bucket that
-- slid out is dropped; an overrun there is charged to the current one, in full.
local function sliding_add(lim, delta, ref)
  local cur, target = lim[CUR], ref or lim[CUR]
  if target < cur - lim[N] then
    if delta < 0 then return false end
    target = cur
  end
  if target == cur then
    lim[CELL] = lim[CELL] + delta
  elseif lim[MOVED] and target == lim[HEAD] then
    lim[PREV] = lim[PREV] + delta     -- written with the move
  else
    lim[INCR] = lim[INCR] or {}
    lim[INCR][#lim[INCR] + 1] = {cell_field(lim, target), delta}
  end
  local total = lim[TOTAL] + delta
  lim[TOTAL], lim[USED] = total, total
  return true
end

-- What a window that moved on writes besides its state, appended to out (from index n+1):
-- the old newest count gets its own field and the sub-buckets skipped on the way start at 0
-- (but those that held 0, or nothing, when read); the cell of the new newest one is not read
-- until the window moves again. A window idle for a whole window drops every cell. Returns the
-- new n.
local function sliding_moved_fields(K, lim, out, n)
  if lim[IDLE] then
    local drop = {}
    for c = 0, lim[N] do drop[c + 1] = cell_field(lim, c) end
    redis.call('HDEL', K, unpack(drop))
    return n
  end
  local head, cur, at = lim[HEAD], lim[CUR], lim[EXPIRED_AT]
  out[n + 1], out[n + 2], n = cell_field(lim, head), int_text(lim[PREV]), n + 2
  -- (a HINCRBY of sliding_fields runs first: its cell is written 0 after it, as always)
  if lim[INCR] then at = false end
  local counts, cells, m = EXPIRED_COUNTS, lim[CELLS], lim[N] + 1
  for b = head + 1, cur - 1 do
    if not at or counts[at + b - head - 1] ~= 0 then
      out[n + 1], out[n + 2], n = cells[b % m + 1] or cell_field(lim, b), '0', n + 2
    end
  end
  return n
end

-- A reserve's charge: sliding_add(lim, amount, false), which always applies, with the
-- window's fields appended to out (from index n+1; no `out`: a dry run, nothing is written).
-- Returns the new n, how long K must live for this window (sliding_ttl's), what remains of the
-- limit, and in how many ms it is empty again (sliding_reset's): one call per limit instead of
-- three. It charges the current sub-bucket, CUR, which charge_refs records for settle. (The
-- loaded limit keeps its usage before the charge: nothing reads it after.)
local function sliding_charge(K, lim, amount, out, n, now)
  local cur, span, width = lim[CUR], lim[N] + 1, lim[WIDTH]
  local total, cell = lim[TOTAL] + amount, lim[CELL] + amount
  if out then
    out[n + 1], out[n + 2] = lim[LID], spack(SLIDING_STATE_FORMAT, cur, total, cell)
    n = n + 2
    if lim[MOVED] then n = sliding_moved_fields(K, lim, out, n) end
  end
  local reset = 0
  if total > 0 then reset = ceil(((cell > 0 and cur or lim[HEAD]) + span) * width - now) end
  return n, (cur + span) * width - now, lim[CAP] - total, reset
end

-- The changed window's fields, appended to out (from index n+1), and the HINCRBYs of settled
-- sub-buckets older than the newest; returns the new n, and sliding_ttl's (computed here: a
-- Lua call costs more).
local function sliding_fields(K, lim, out, n, now)
  local cur = lim[CUR]
  out[n + 1], out[n + 2] = lim[LID], spack(SLIDING_STATE_FORMAT, cur, lim[TOTAL], lim[CELL])
  n = n + 2
  if lim[MOVED] then n = sliding_moved_fields(K, lim, out, n) end
  if lim[INCR] then
    for _, inc in ipairs(lim[INCR]) do redis.call('HINCRBY', K, inc[1], int_text(inc[2])) end
  end
  return n, (cur + lim[N] + 1) * lim[WIDTH] - now
end

-- How long K must live so that this window forgets no usage that still counts.
local function sliding_ttl(lim, now)
  return (lim[CUR] + lim[N] + 1) * lim[WIDTH] - now
end

-- In how many ms the window is empty again: once its newest non-empty sub-bucket slides out.
local function sliding_reset(lim, now)
  if lim[TOTAL] <= 0 then return 0 end
  return ceil(((lim[CELL] > 0 and lim[CUR] or lim[HEAD]) + lim[N] + 1) * lim[WIDTH] - now)
end

-- Milliseconds until `need` more units fit: walks from the oldest counted sub-bucket until
-- enough has slid out. Sub-buckets after head are empty; head's count is in SLIDING_STATE
-- until the window moves (PREV after).
local function sliding_retry(K, lim, need, now)
  local n, cur, head = lim[N], lim[CUR], lim[HEAD]
  local excess, last = lim[USED] + need - lim[CAP], min(head, cur - 1)
  local fields = {}
  for b = cur - n, last do fields[#fields + 1] = cell_field(lim, b) end
  if #fields > 0 then
    local got = redis.call('HMGET', K, unpack(fields))
    local freed = 0
    for j = 1, #fields do
      local b = cur - n + j - 1
      if b == head then freed = freed + (lim[MOVED] and lim[PREV] or lim[CELL])
      else freed = freed + (tonumber(got[j]) or 0) end
      if freed >= excess then return ceil((b + n + 1) * lim[WIDTH] - now) end
    end
  end
  return ceil((cur + n + 1) * lim[WIDTH] - now)
end
