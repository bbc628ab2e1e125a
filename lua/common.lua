-- common.lua: helpers shared by every ratelimitd script. scripts.py prepends this file to each
-- entry script, so every script stays one atomic EVALSHA over the keys of one hash slot.
--
-- Units: every amount is an integer (requests, tokens, cost in nano-USD); times are integer ms of
-- Redis server time (TIME), unless a test-built engine passes an explicit clock. Numbers go to
-- redis.call as Lua numbers: Redis formats them with %.17g, exact for integers below 2^53.
--
-- Limit state lives in the subject hash K, in fields prefixed by the limit's short id (lid):
--   sliding window:  lid:h = newest sub-bucket index, lid:t = running total, lid:<i> = sub-bucket
--                    i mod (n+1). n+1 cells make the counted span cover the whole window plus at
--                    most one sub-bucket: conservative by <= 1/n of the window, never generous.
--   calendar period: lid:p = start of the period the value belongs to, lid:v = value.
--   token bucket:    lid:l = level (below 0 after an overrun), lid:s = last refill time.
-- K's field `x` is the expiry K was last given, so most calls skip PEXPIRE.
-- In-flight reservations (metric "concurrent", code n) are a sliding window as long as the
-- reservation TTL: a reserve adds 1 to the current sub-bucket, its commit or release takes it
-- back, and an abandoned one slides out after the TTL (plus at most one sub-bucket), so a
-- crashed gateway cannot leak slots.

local tonumber, floor, ceil = tonumber, math.floor, math.ceil

local function now_ms(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end

-- A call's usage in each metric: u = {requests, input, output, fixed, po, inflight}, where
-- fixed is the input side's price numerator (tokens x micro-USD per 1M), po the output price,
-- and inflight 1 while the call holds a concurrency slot (settle sets 0 when it ends).
local function usage_of(requests, input, cached, output, pi, pc, po)
  return {requests = requests, input = input, output = output,
          fixed = (input - cached) * pi + cached * pc, po = po, inflight = 1}
end

local function amount(metric, u)
  if metric == 'r' then return u.requests end
  if metric == 't' then return u.input + u.output end
  if metric == 'i' then return u.input end
  if metric == 'o' then return u.output end
  if metric == 'c' then return ceil((u.fixed + u.output * u.po) / 1000) end
  return u.inflight
end

-- A limit from its spec: lid, algorithm (s|c|b), metric (r|t|i|o|c|n), limit, p1, p2.
--   sliding: p1 = window ms, p2 = sub-buckets;  token bucket: p1 = window ms, p2 = burst;
--   calendar: p1 = comma-separated period starts (ms), p2 unused.
-- The fields every call sets are named here, so Lua sizes the table once (rarer ones, such as
-- the cells to drop after a pause, are added when needed).
local function new_limit(lid, algo, metric, limit, p1, p2)
  return {lid = lid, algo = algo, metric = metric, limit = tonumber(limit), p1 = p1,
          p2 = tonumber(p2), f1 = false, f2 = false, used = 0, dirty = false,
          cur = 0, w = 0, head = 0, total = 0, cell = 0, cellf = false}
end

local function parse_limits(first, count)
  local limits = {}
  for k = 0, count - 1 do
    local a = first + k * 6
    limits[k + 1] = new_limit(ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
                              ARGV[a + 5])
  end
  return limits
end

-- Capacity of a limit in its own metric (a token bucket holds up to its burst).
local function capacity(lim)
  if lim.algo == 'b' then return lim.p2 end
  return lim.limit
end

-- Reads every limit's state (one HMGET) and brings it to `now`, in memory; write_limits()
-- stores what changed. Sets lim.used for each limit; returns K's `x` field.
local function load_limits(K, limits, now)
  local fields, slot, nf = {'x'}, {}, 1
  for k, lim in ipairs(limits) do
    local lid = lim.lid
    slot[k] = nf + 1
    if lim.algo == 's' then
      local n = lim.p2
      lim.w = tonumber(lim.p1) / n
      lim.cur = floor(now / lim.w)
      lim.f1, lim.f2, lim.cellf = lid .. ':h', lid .. ':t', lid .. ':' .. (lim.cur % (n + 1))
      fields[nf + 1], fields[nf + 2], fields[nf + 3] = lim.f1, lim.f2, lim.cellf
      nf = nf + 3
    else
      if lim.algo == 'c' then
        lim.f1, lim.f2 = lid .. ':p', lid .. ':v'
      else
        lim.f1, lim.f2 = lid .. ':l', lid .. ':s'
      end
      fields[nf + 1], fields[nf + 2] = lim.f1, lim.f2
      nf = nf + 2
    end
  end
  local v = redis.call('HMGET', K, unpack(fields))
  local clear = nil
  for k, lim in ipairs(limits) do
    local i = slot[k]
    if lim.algo == 's' then
      local n, cur = lim.p2, lim.cur
      local head, total = tonumber(v[i]) or cur, tonumber(v[i + 1]) or 0
      lim.moved = v[i] == false          -- a new window: its head is written too
      local cell = tonumber(v[i + 2]) or 0
      if head > cur then
        -- Redis time stepped back (a failover): keep counting in the newer sub-bucket
        cur = head
        lim.cur, lim.cellf = cur, lim.lid .. ':' .. (cur % (n + 1))
        cell = tonumber(redis.call('HGET', K, lim.cellf)) or 0
      end
      if cur > head then
        -- cells of buckets head+1 .. cur hold buckets that slid out of the window
        if cur - head > n then
          total, lim.clear_all = 0, true
        else
          total = total - cell
          for b = head + 1, cur - 1 do
            clear = clear or {}
            clear[#clear + 1] = {lim, lim.lid .. ':' .. (b % (n + 1))}
          end
        end
        cell = 0
        lim.moved = true
      end
      lim.head, lim.total, lim.cell, lim.used = head, total, cell, total
    elseif lim.algo == 'c' then
      local prev = nil
      for b in string.gmatch(lim.p1, '%d+') do
        b = tonumber(b)
        if prev ~= nil and prev <= now and now < b then lim.start, lim.stop = prev, b end
        prev = b
      end
      if lim.start == nil then lim.stale, lim.start, lim.stop = true, now, now + 1 end
      lim.moved = tonumber(v[i]) ~= lim.start     -- a new period: its start is written too
      lim.used = lim.moved and 0 or (tonumber(v[i + 1]) or 0)
    else
      local window, burst, rate = tonumber(lim.p1), lim.p2, lim.limit
      local level, ts = tonumber(v[i]), tonumber(v[i + 1])
      if level == nil or ts > now then level, ts = level or burst, now end
      if level < burst then
        local add = floor((now - ts) * rate / window)
        if add > 0 then
          level = level + add
          -- the refill clock moves only by the time those whole units took: never generous
          ts = ts + ceil(add * window / rate)
        end
      end
      if level >= burst then level, ts = burst, now end
      lim.level, lim.ts, lim.used = level, ts, burst - level
    end
  end
  if clear then
    local f = {}
    for j = 1, #clear do f[j] = clear[j][2] end
    local got = redis.call('HMGET', K, unpack(f))
    for j = 1, #clear do
      local lim = clear[j][1]
      lim.total = lim.total - (tonumber(got[j]) or 0)
      lim.used = lim.total
      lim.drop = lim.drop or {}
      lim.drop[#lim.drop + 1] = f[j]
    end
  end
  return tonumber(v[1]) or 0
end

-- Adds delta (may be negative) to a loaded limit. ref: the sub-bucket or period the delta
-- belongs to (nil: the current one). A refund for a sub-bucket or period that is over is
-- dropped; an overrun there is charged to the current one, in full.
local function add_to_limit(lim, delta, ref)
  if lim.algo == 's' then
    local target = ref or lim.cur
    if target < lim.cur - lim.p2 then
      if delta < 0 then return end
      target = lim.cur
    end
    lim.total = lim.total + delta
    lim.used = lim.total
    if target == lim.cur then
      lim.cell = lim.cell + delta
    else
      lim.incr = lim.incr or {}
      lim.incr[#lim.incr + 1] = {lim.lid .. ':' .. (target % (lim.p2 + 1)), delta}
    end
  elseif lim.algo == 'c' then
    if lim.stale then return end
    if ref ~= nil and ref ~= lim.start and (delta < 0 or ref > lim.start) then return end
    lim.used = math.max(0, lim.used + delta)
  else
    lim.level = math.min(lim.p2, lim.level - delta)
    lim.used = lim.p2 - lim.level
  end
  lim.dirty = true
end

-- How long K must live so that no limit forgets usage that still counts.
local function state_ttl(lim, now)
  if lim.algo == 's' then return (lim.cur + lim.p2 + 1) * lim.w - now end
  if lim.algo == 'c' then return lim.stop - now end
  return ceil((lim.p2 - lim.level) * tonumber(lim.p1) / lim.limit)
end

-- Writes what changed (one HSET), drops slid-out cells, and extends K's life when needed.
local function write_limits(K, limits, now, x)
  local out, drop, need, n = {}, {}, 1000, 0
  for _, lim in ipairs(limits) do
    if lim.algo == 's' then
      if lim.dirty or lim.moved then
        -- the newest sub-bucket index changes only when the window moved
        if lim.moved then out[n + 1], out[n + 2], n = lim.f1, lim.cur, n + 2 end
        out[n + 1], out[n + 2], out[n + 3], out[n + 4] = lim.f2, lim.total, lim.cellf, lim.cell
        n = n + 4
        if lim.clear_all then
          for c = 0, lim.p2 do
            local f = lim.lid .. ':' .. c
            if f ~= lim.cellf then drop[#drop + 1] = f end
          end
        end
        if lim.drop then
          for _, f in ipairs(lim.drop) do drop[#drop + 1] = f end
        end
        if lim.incr then
          for _, inc in ipairs(lim.incr) do redis.call('HINCRBY', K, inc[1], inc[2]) end
        end
      end
    elseif lim.dirty then
      if lim.algo == 'c' then
        if lim.moved then out[n + 1], out[n + 2], n = lim.f1, lim.start, n + 2 end
        out[n + 1], out[n + 2], n = lim.f2, lim.used, n + 2
      else
        out[n + 1], out[n + 2], out[n + 3], out[n + 4] = lim.f1, lim.level, lim.f2, lim.ts
        n = n + 4
      end
    end
    local t = state_ttl(lim, now)
    if t > need then need = t end
  end
  if #drop > 0 then redis.call('HDEL', K, unpack(drop)) end
  if n == 0 then return end
  -- K lives `need` ms more, plus slack so a busy subject pays for a PEXPIRE only now and then.
  if x < now + need then
    x = now + need + floor(need / 8) + 1000
    out[n + 1], out[n + 2] = 'x', x
    redis.call('HSET', K, unpack(out))
    redis.call('PEXPIRE', K, x - now)  -- relative: a test clock need not agree with Redis
  else
    redis.call('HSET', K, unpack(out))
  end
end

-- What a reply says of a limit: remaining, and ms until it is back to full.
local function describe(lim, now)
  local remaining, reset = capacity(lim) - lim.used, 0
  if lim.metric == 'n' then
    reset = 0  -- a slot frees when a call ends, which no clock can tell
  elseif lim.algo == 's' then
    -- the window is empty again once the newest non-empty sub-bucket slides out
    if lim.total > 0 then
      reset = ((lim.cell > 0 and lim.cur or lim.head) + lim.p2 + 1) * lim.w - now
    end
  elseif lim.algo == 'c' then
    reset = lim.stop - now
  elseif lim.level < lim.p2 then
    reset = ceil((lim.p2 - lim.level) * tonumber(lim.p1) / lim.limit)
  end
  if remaining < 0 then remaining = 0 end
  return remaining, reset
end

-- Appends describe() of every limit to a reply: remaining, reset ms per limit.
local function with_states(out, limits, now)
  for _, lim in ipairs(limits) do
    local remaining, reset = describe(lim, now)
    out[#out + 1] = remaining; out[#out + 1] = reset
  end
  return out
end

-- Milliseconds until `need` more units fit in a loaded limit; -1 when they never can.
local function retry_after(K, lim, need, now)
  if need > capacity(lim) then return -1 end
  if lim.algo == 'c' then return lim.stop - now end
  if lim.algo == 'b' then
    return math.max(1, ceil((need - lim.level) * tonumber(lim.p1) / lim.limit))
  end
  -- sliding: walk from the oldest counted sub-bucket until enough has slid out
  local n = lim.p2
  local excess = lim.used + need - lim.limit
  local fields = {}
  for b = lim.cur - n, math.min(lim.head, lim.cur - 1) do
    fields[#fields + 1] = lim.lid .. ':' .. (b % (n + 1))
  end
  if #fields > 0 then
    local got = redis.call('HMGET', K, unpack(fields))
    local freed = 0
    for j = 1, #fields do
      freed = freed + (tonumber(got[j]) or 0)
      if freed >= excess then return (lim.cur + j) * lim.w - now end
    end
  end
  return (lim.cur + n + 1) * lim.w - now
end

-- A reservation record is one MessagePack array (packed and unpacked in C):
--   state, expires, input, output, pi, pc, po, actual input, cached, output, other subjects,
--   then 8 values per charged limit: its spec (the six ARGV words), the sub-bucket or period
--   charged, and the amount. A settled record keeps no charges: it only answers repeats.
local REC_CHARGES = 12

local function parse_record(raw)
  local r = cmsgpack.unpack(raw)
  local rec = {r = r, s = r[1], e = r[2], i = r[3], o = r[4], pi = r[5], pc = r[6], po = r[7],
               u = {r[8], r[9], r[10]}, sec = r[11], charges = {}}
  for j = REC_CHARGES, #r, 8 do
    local lim = new_limit(r[j], r[j + 1], r[j + 2], r[j + 3], r[j + 4], r[j + 5])
    lim.ref, lim.amt, lim.at = r[j + 6], r[j + 7], j
    rec.charges[#rec.charges + 1] = lim
  end
  return rec
end
