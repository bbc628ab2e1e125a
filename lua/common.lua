-- common.lua: helpers shared by ratelimitd's Redis functions. scripts.py builds one function
-- library from this file and the entry scripts (reserve.lua, settle.lua), each registered as a
-- function, so every call stays one atomic FCALL over the keys of one hash slot. A library (not
-- EVALSHA scripts) because a script would define every helper below again on every call.
--
-- Units: every amount is an integer (requests, tokens, cost in nano-USD); times are integer ms of
-- Redis server time (TIME), unless a test-built engine passes an explicit clock.
--
-- Speed matters here: every model call runs a reserve and a commit. Measured with callgrind,
-- what costs most in Redis' Lua is parsing numbers from strings (strtod), building and growing
-- tables, and formatting numbers, so arguments, state and replies are packed binary (struct,
-- in C), a loaded limit is an array with named slots, a call reads and writes one small field
-- per limit (one HMGET, one HSET), and older sub-buckets are touched only when a window moves.
--
-- Limit state lives in the subject hash K, one field per limit named by the limit's id (lid,
-- 8 chars), packed doubles. The first call writes these fields first, and a small hash scans its
-- fields in order, so they stay quick to find however many sub-bucket fields follow.
--   sliding window:  lid = SLIDING_STATE(newest sub-bucket index, running total, the newest
--                    sub-bucket's count); lid:<i> = the count of an older sub-bucket b with
--                    b mod (n+1) = i.
--                    n+1 cells make the counted span cover the whole window plus at most one
--                    sub-bucket: conservative by <= 1/n of the window, never generous.
--   calendar period: lid = PAIR(start of the period the value belongs to, value).
--   token bucket:    lid = PAIR(level (below 0 after an overrun), last refill time).
-- K's field `x` is DOUBLE(the expiry K was last given), so most calls skip PEXPIRE.
-- In-flight reservations (metric "concurrent") are a sliding window as long as the
-- reservation TTL: a reserve adds 1 to the current sub-bucket, its commit or release takes it
-- back, and an abandoned one slides out after the TTL (plus at most one sub-bucket), so a
-- crashed gateway cannot leak slots.

-- Redis runs a library's top level without globals, so bind_globals() binds these on the first
-- call (to the same values every time).
local tonumber, ipairs, unpack, floor, ceil, max, min, spack, sunpack, srep
local function bind_globals()
  if floor then return end
  tonumber, ipairs, unpack = _G.tonumber, _G.ipairs, _G.unpack
  floor, ceil, max, min = _G.math.floor, _G.math.ceil, _G.math.max, _G.math.min
  spack, sunpack, srep = _G.struct.pack, _G.struct.unpack, _G.string.rep
end

local DOUBLE, PAIR, SLIDING_STATE = '<d', '<dd', '<ddd'
-- A limit spec, as engine.py encodes it: lid, algorithm, metric, limit, then four parameters:
-- sliding: window ms, sub-buckets;  token bucket: window ms, burst;  calendar: the starts (ms)
-- of the previous, current and next two periods. Codes are numbers (engine.py's
-- _ALGORITHM_CODES and _METRIC_CODES), which Lua reads without building strings.
local SPEC, SPEC_SIZE = '<c8BBddddd', 50
local ALG_SLIDING, ALG_CALENDAR, ALG_BUCKET = 1, 2, 3
local REQUESTS, TOKENS, INPUT, OUTPUT, COST, CONCURRENT = 1, 2, 3, 4, 5, 6

-- The slots of a loaded limit. Every limit: LID, ALGO, METRIC, CAP (capacity in its own metric;
-- a token bucket holds up to its burst), USED (of CAP, as loaded and changed), DIRTY (changed),
-- REF (settle: the sub-bucket or period the reserve charged). Then by algorithm:
-- (scripts.py writes these names, and the codes above, as numbers when it builds the library:
-- Lua reads a name from outside a function as an upvalue, one more instruction per use.)
local LID, ALGO, METRIC, CAP, USED, DIRTY, REF = 1, 2, 3, 4, 5, 6, 7
-- sliding: sub-buckets, sub-bucket ms, current and newest-stored sub-bucket, running total,
-- current count; after a move: the old newest count, whether the window was idle for a whole
-- window, and deltas for older sub-buckets
local N, WIDTH, CUR, HEAD, TOTAL = 8, 9, 10, 11, 12
local CELL, MOVED, PREV, IDLE, INCR = 13, 14, 15, 16, 17
-- calendar: the four period starts, then the current period and whether Redis time is outside
-- all of them
local P0, P1, P2, P3, START, STOP, STALE = 8, 9, 10, 11, 12, 13, 14
-- token bucket: refill per window, window ms, burst, level, last refill
local RATE, WINDOW, BURST, LEVEL, TS = 8, 9, 10, 11, 12

local function now_ms(override)
  if override > 0 then return override end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end

-- What a call counts in each metric, indexed by metric code: requests, tokens, input and
-- output tokens, cost (nano-USD, from prices in micro-USD per 1M tokens), and in-flight calls
-- (1 while the call holds a concurrency slot; settle counts 0 once it ends).
local function amounts(requests, input, cached, output, pi, pc, po, inflight)
  return {requests, input + output, input, output,
          ceil(((input - cached) * pi + cached * pc + output * po) / 1000), inflight}
end

-- New arrays with room for 8 or 16 values. Lua grows a table by reallocating it, which
-- callgrind showed to be a good share of a call, so arrays filled in a loop start here (and are
-- read with unpack(t, 1, n)).
local function array8()
  return {false, false, false, false, false, false, false, false}
end
local function array16()
  return {false, false, false, false, false, false, false, false,
          false, false, false, false, false, false, false, false}
end

-- struct formats of n signed 64-bit integers or n doubles, built once per n
local LONGS, DOUBLES = {}, {}
local function longs(n)
  local f = LONGS[n]
  if not f then f = '<' .. srep('l', n); LONGS[n] = f end
  return f
end
local function doubles(n)
  local f = DOUBLES[n]
  if not f then f = '<' .. srep('d', n); DOUBLES[n] = f end
  return f
end

-- Limits from a blob of specs. Each array is built with every slot a call sets (no holes), so
-- Lua sizes it once.
local function parse_specs(blob)
  local limits, pos, n = array8(), 1, #blob / SPEC_SIZE
  for k = 1, n do
    local lid, algo, metric, limit, a, b, c, d
    lid, algo, metric, limit, a, b, c, d, pos = sunpack(SPEC, blob, pos)
    if algo == ALG_SLIDING then
      -- LID, ALGO, METRIC, CAP, USED, DIRTY, REF, N, WIDTH, CUR, HEAD, TOTAL, CELL, MOVED, PREV
      limits[k] = {lid, algo, metric, limit, 0, false, false, b, a / b, 0, 0, 0, 0, false, 0}
    elseif algo == ALG_CALENDAR then
      -- LID, ALGO, METRIC, CAP, USED, DIRTY, REF, P0, P1, P2, P3, START, STOP, STALE
      limits[k] = {lid, algo, metric, limit, 0, false, false, a, b, c, d, 0, 0, false}
    else
      -- LID, ALGO, METRIC, CAP, USED, DIRTY, REF, RATE, WINDOW, BURST, LEVEL, TS
      limits[k] = {lid, algo, metric, b, 0, false, false, limit, a, b, 0, 0}
    end
  end
  for k = n + 1, 8 do limits[k] = nil end
  return limits
end

-- Limits parsed from a spec blob, by blob, with the fields load_limits reads (K's `x`, then
-- each limit's state). Every call of one tier and subject kind sends the same blob (until a
-- calendar period ends), and a settle finds it in the reservation record, so a blob is parsed
-- once; 256 blobs fill the cache, which then starts over. Each call with the blob uses the
-- same limit arrays (Redis runs one call at a time): load_limits() resets every slot a call
-- sets (but REF, which settle sets on every limit first), so a call starts from the specs
-- alone, as after a fresh parse. Measured with callgrind, copying the arrays instead costs ~9%
-- of a reserve (allocation and garbage), and parsing them ~16% of a commit.
local PARSED, nparsed = {}, 0
local function limits_of(blob)
  local parsed = PARSED[blob]
  if not parsed then
    if nparsed >= 256 then PARSED, nparsed = {}, 0 end
    local limits, fields = parse_specs(blob), {'x'}
    for k = 1, #limits do fields[k + 1] = limits[k][LID] end
    parsed = {limits, fields}
    PARSED[blob], nparsed = parsed, nparsed + 1
  end
  return parsed[1], parsed[2]
end

-- The field of an older sub-bucket of a sliding window.
local function cell_field(lim, bucket)
  return lim[LID] .. ':' .. (bucket % (lim[N] + 1))
end

-- Brings a sliding window to `now`, in memory. When it moved on, the sub-buckets head+1 .. cur
-- reuse cells of sub-buckets that slid out: their fields go to `expired` (read by the caller;
-- returned, made when first needed) and the newest count leaves SLIDING_STATE for its own field
-- (written by write_limits).
local function load_sliding(lim, raw, now, expired)
  local n, cur = lim[N], floor(now / lim[WIDTH])
  local head, total, cell = cur, 0, 0
  if raw then head, total, cell = sunpack(SLIDING_STATE, raw) end
  -- Redis time stepped back (a failover): keep counting in the newer sub-bucket
  if head > cur then cur = head end
  if cur > head then
    lim[MOVED], lim[PREV] = true, cell
    if cur - head > n then
      total, lim[IDLE] = 0, true          -- idle for a whole window: every cell is stale
    else
      expired = expired or {}
      for b = head + 1, cur do expired[#expired + 1] = {lim, cell_field(lim, b)} end
    end
    cell = 0
  end
  lim[CUR], lim[HEAD], lim[TOTAL], lim[CELL], lim[USED] = cur, head, total, cell, total
  return expired
end

local function load_calendar(lim, raw, now)
  local start, stop
  if lim[P0] <= now and now < lim[P1] then start, stop = lim[P0], lim[P1]
  elseif lim[P1] <= now and now < lim[P2] then start, stop = lim[P1], lim[P2]
  elseif lim[P2] <= now and now < lim[P3] then start, stop = lim[P2], lim[P3]
  else lim[STALE], start, stop = true, now, now + 1 end
  lim[START], lim[STOP] = start, stop
  if raw then
    local stored, value = sunpack(PAIR, raw)
    if stored == start then lim[USED] = value end
  end
end

local function load_bucket(lim, raw, now)
  local window, burst, rate = lim[WINDOW], lim[BURST], lim[RATE]
  local level, ts = burst, now
  if raw then level, ts = sunpack(PAIR, raw) end
  if ts > now then ts = now end
  if level < burst then
    local add = floor((now - ts) * rate / window)
    if add > 0 then
      level = level + add
      -- the refill clock moves only by the time those whole units took: never generous
      ts = ts + ceil(add * window / rate)
    end
  end
  if level >= burst then level, ts = burst, now end
  lim[LEVEL], lim[TS], lim[USED] = level, ts, burst - level
end

-- Reads every limit's state (one HMGET of `fields`, from limits_of(), and one more for windows
-- that moved on) and brings it to `now`, in memory; write_limits() stores what changed. Sets
-- USED of each limit; returns K's `x` field.
local function load_limits(K, limits, fields, now)
  local nl = #limits
  local v = redis.call('HMGET', K, unpack(fields))
  local expired = false
  for k = 1, nl do
    local lim, raw = limits[k], v[k + 1]
    local algo = lim[ALGO]
    -- reset what an earlier call on these arrays may have set (see limits_of)
    lim[USED], lim[DIRTY] = 0, false
    if algo == ALG_SLIDING then
      lim[MOVED], lim[PREV], lim[IDLE], lim[INCR] = false, 0, nil, nil
      expired = load_sliding(lim, raw, now, expired)
    elseif algo == ALG_CALENDAR then
      lim[STALE] = false
      load_calendar(lim, raw, now)
    else
      load_bucket(lim, raw, now)
    end
  end
  if expired then
    local f = {}
    for j = 1, #expired do f[j] = expired[j][2] end
    local got = redis.call('HMGET', K, unpack(f))
    for j = 1, #expired do
      local lim = expired[j][1]
      lim[TOTAL] = lim[TOTAL] - (tonumber(got[j]) or 0)
      lim[USED] = lim[TOTAL]
    end
  end
  local x = v[1]
  if x and #x == 8 then return (sunpack(DOUBLE, x)) end
  return 0   -- none yet, or not ours: K's expiry is set again
end

-- Adds delta (may be negative) to a loaded limit. ref: the sub-bucket or period the delta
-- belongs to (false: the current one). A refund for a sub-bucket or period that is over is
-- dropped; an overrun there is charged to the current one, in full.
local function add_to_limit(lim, delta, ref)
  local algo = lim[ALGO]
  if algo == ALG_SLIDING then
    local cur, target = lim[CUR], ref or lim[CUR]
    if target < cur - lim[N] then
      if delta < 0 then return end
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
    lim[TOTAL] = lim[TOTAL] + delta
    lim[USED] = lim[TOTAL]
  elseif algo == ALG_CALENDAR then
    if lim[STALE] then return end
    local start = lim[START]
    if ref and ref ~= start and (delta < 0 or ref > start) then return end
    lim[USED] = max(0, lim[USED] + delta)
  else
    lim[LEVEL] = min(lim[BURST], lim[LEVEL] - delta)
    lim[USED] = lim[BURST] - lim[LEVEL]
  end
  lim[DIRTY] = true
end

-- A changed sliding window's fields, appended to out (from index n+1); returns the new n.
-- After a move the old newest count gets its own field and the sub-buckets skipped on the way
-- start at 0; the cell of the new newest one is not read until the window moves again.
local function sliding_fields(K, lim, out, n)
  out[n + 1], out[n + 2] = lim[LID], spack(SLIDING_STATE, lim[CUR], lim[TOTAL], lim[CELL])
  n = n + 2
  if lim[IDLE] then
    local drop = {}
    for c = 0, lim[N] do drop[c + 1] = cell_field(lim, c) end
    redis.call('HDEL', K, unpack(drop))
  elseif lim[MOVED] then
    out[n + 1], out[n + 2], n = cell_field(lim, lim[HEAD]), lim[PREV], n + 2
    for b = lim[HEAD] + 1, lim[CUR] - 1 do
      out[n + 1], out[n + 2], n = cell_field(lim, b), 0, n + 2
    end
  end
  if lim[INCR] then
    for _, inc in ipairs(lim[INCR]) do redis.call('HINCRBY', K, inc[1], inc[2]) end
  end
  return n
end

-- Writes what changed (one HSET) and extends K's life when needed. A window that only moved on
-- is not written: the next load moves it again the same way.
local function write_limits(K, limits, now, x)
  local out, need, n = array16(), 1000, 0
  for k = 1, #limits do
    local lim = limits[k]
    local algo = lim[ALGO]
    if lim[DIRTY] then
      if algo == ALG_SLIDING then
        n = sliding_fields(K, lim, out, n)
      elseif algo == ALG_CALENDAR then
        out[n + 1], out[n + 2], n = lim[LID], spack(PAIR, lim[START], lim[USED]), n + 2
      else
        out[n + 1], out[n + 2], n = lim[LID], spack(PAIR, lim[LEVEL], lim[TS]), n + 2
      end
    end
    -- how long K must live so that this limit forgets no usage that still counts
    local t
    if algo == ALG_SLIDING then
      t = (lim[CUR] + lim[N] + 1) * lim[WIDTH] - now
    elseif algo == ALG_CALENDAR then
      t = lim[STOP] - now
    else
      t = ceil((lim[BURST] - lim[LEVEL]) * lim[WINDOW] / lim[RATE])
    end
    if t > need then need = t end
  end
  if n == 0 then return end
  -- K lives `need` ms more, plus slack so a busy subject pays for a PEXPIRE only now and then.
  if x < now + need then
    x = now + need + floor(need / 8) + 1000
    out[n + 1], out[n + 2] = 'x', spack(DOUBLE, x)
    redis.call('HSET', K, unpack(out, 1, n + 2))
    redis.call('PEXPIRE', K, x - now)  -- relative: a test clock need not agree with Redis
  else
    redis.call('HSET', K, unpack(out, 1, n))
  end
end

-- A reply: seven numbers, then for every limit what remains and in how many ms it is back to
-- full, as signed 64-bit integers; then `tail` (an opaque string) when given.
local function packed_reply(limits, now, tail, v1, v2, v3, v4, v5, v6, v7)
  local out, n = {v1, v2, v3, v4, v5, v6, v7, false, false, false, false, false, false, false,
                  false, false}, 7
  for k = 1, limits and #limits or 0 do
    local lim = limits[k]
    local remaining, reset, algo = lim[CAP] - lim[USED], 0, lim[ALGO]
    if lim[METRIC] == CONCURRENT then
      reset = 0  -- a slot frees when a call ends, which no clock can tell
    elseif algo == ALG_SLIDING then
      -- the window is empty again once the newest non-empty sub-bucket slides out
      if lim[TOTAL] > 0 then
        reset = ((lim[CELL] > 0 and lim[CUR] or lim[HEAD]) + lim[N] + 1) * lim[WIDTH] - now
      end
    elseif algo == ALG_CALENDAR then
      reset = lim[STOP] - now
    elseif lim[LEVEL] < lim[BURST] then
      reset = ceil((lim[BURST] - lim[LEVEL]) * lim[WINDOW] / lim[RATE])
    end
    if remaining < 0 then remaining = 0 end
    out[n + 1], out[n + 2], n = remaining, reset, n + 2
  end
  local reply = spack(longs(n + 1), n, unpack(out, 1, n))
  if tail then return reply .. tail end
  return reply
end

-- Milliseconds until `need` more units fit in a loaded limit; -1 when they never can.
local function retry_after(K, lim, need, now)
  if need > lim[CAP] then return -1 end
  local algo = lim[ALGO]
  if algo == ALG_CALENDAR then return lim[STOP] - now end
  if algo == ALG_BUCKET then
    return max(1, ceil((need - lim[LEVEL]) * lim[WINDOW] / lim[RATE]))
  end
  -- sliding: walk from the oldest counted sub-bucket until enough has slid out. Sub-buckets
  -- after head are empty; head's count is in SLIDING_STATE until the window moves (PREV after).
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
      if freed >= excess then return (b + n + 1) * lim[WIDTH] - now end
    end
  end
  return (cur + n + 1) * lim[WIDTH] - now
end

-- A reservation record: REC, then for each charged limit the sub-bucket or period it charged
-- (a double), then the limit specs as reserve got them, then the other subjects (the rest).
-- The amounts charged follow from the record (input, output, prices), so they are not kept.
-- A settled record keeps no charges: it only answers repeats.
--   REC: state (r reserved, c committed, x released), expires, input, output, pi, pc, po,
--        actual input, cached, output, number of charged limits
local REC, REC_SIZE = '<c1dddddddddd', 81

local RECORDS = {}
local function record_format(n)   -- REC and n charges, built once per n
  local f = RECORDS[n]
  if not f then f = REC .. srep('d', n); RECORDS[n] = f end
  return f
end

-- A record's REC part: a settled record is only this; a resized one keeps what followed it.
local function record(state, expires, input, output, pi, pc, po, u_in, u_cached, u_out, n)
  return spack(REC, state, expires, input, output, pi, pc, po, u_in, u_cached, u_out, n)
end

local function parse_record(raw)
  local s, e, i, o, pi, pc, po, ui, uc, uo, n = sunpack(REC, raw)
  local specs_at = REC_SIZE + 8 * n + 1
  local rec = {s = s, e = e, i = i, o = o, pi = pi, pc = pc, po = po, u = {ui, uc, uo},
               charges = false, fields = false, sec = raw:sub(specs_at + SPEC_SIZE * n),
               raw = raw}
  if n > 0 then
    -- the specs as the reserve got them: most likely parsed already
    rec.charges, rec.fields = limits_of(raw:sub(specs_at, specs_at + SPEC_SIZE * n - 1))
    local refs = {sunpack(doubles(n), raw, REC_SIZE + 1)}
    for k = 1, n do rec.charges[k][REF] = refs[k] end
  end
  return rec
end
