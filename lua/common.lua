-- common.lua: helpers shared by every ratelimitd script. scripts.py prepends this file to each
-- entry script, so every script stays one atomic EVALSHA over the keys of one hash slot.
--
-- Units: every amount is an integer (requests, tokens, cost in nano-USD); times are integer ms of
-- Redis server time (TIME), unless a test-built engine passes an explicit clock.
--
-- Limit state lives in the subject hash K, in fields prefixed by the limit's short id (lid):
--   sliding window:  lid:h = newest sub-bucket index, lid:t = running total, lid:<i> = sub-bucket
--                    i mod (n+1). n+1 cells make the counted span cover the whole window plus at
--                    most one sub-bucket: conservative by <= 1/n of the window, never generous.
--   calendar period: lid:p = start of the period the value belongs to, lid:v = value.
--   token bucket:    lid:l = level (may go below 0 after an overrun), lid:s = last refill time.
-- In-flight reservations (metric "concurrent") are members of the sorted set Z scored by expiry.

local function now_ms(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(n) return string.format('%d', n) end

-- Usage of one call in every metric. u = {requests, input, output, fixed, po}: fixed is the
-- price numerator of the input side (tokens x micro-USD per 1M), po the output price.
local function amount(metric, u)
  if metric == 'r' then return u.requests end
  if metric == 't' then return u.input + u.output end
  if metric == 'i' then return u.input end
  if metric == 'o' then return u.output end
  if metric == 'c' then return math.ceil((u.fixed + u.output * u.po) / 1000) end
  return 0
end

-- Cost in nano-USD of a call: prices are micro-USD per 1M tokens, so tokens x price / 1000.
-- Cached input tokens are part of input tokens and priced at pc instead of pi.
local function usage_of(requests, input, cached, output, pi, pc, po)
  return {requests = requests, input = input, output = output,
          fixed = (input - cached) * pi + cached * pc, po = po}
end

-- Parses the limit specs ARGV[first ..] (6 values each):
--   lid, algorithm (s|c|b), metric (r|t|i|o|c|n), limit, p1, p2
--   sliding: p1 = window ms, p2 = sub-buckets;  token bucket: p1 = window ms, p2 = burst;
--   calendar: p1 = comma-separated period boundaries (ms), p2 unused.
local function parse_limits(first, count)
  local limits = {}
  for k = 0, count - 1 do
    local a = first + k * 6
    limits[k + 1] = {lid = ARGV[a], algo = ARGV[a + 1], metric = ARGV[a + 2],
                     limit = tonumber(ARGV[a + 3]), p1 = ARGV[a + 4], p2 = tonumber(ARGV[a + 5])}
  end
  return limits
end

-- Capacity of a limit in its own metric (a token bucket holds up to its burst).
local function capacity(lim)
  if lim.algo == 'b' and lim.metric ~= 'n' then return lim.p2 end
  return lim.limit
end

local function capacity_left(lim) return capacity(lim) - lim.used end

-- Fields of K every limit needs before a decision; one HMGET for all limits.
local function base_fields(lim, now)
  local lid = lim.lid
  if lim.metric == 'n' then return {} end
  if lim.algo == 's' then
    local n = lim.p2
    local w = tonumber(lim.p1) / n
    lim.w = w
    lim.cur = math.floor(now / w)
    return {lid .. ':h', lid .. ':t', lid .. ':' .. (lim.cur % (n + 1))}
  elseif lim.algo == 'c' then
    return {lid .. ':p', lid .. ':v'}
  else
    return {lid .. ':l', lid .. ':s'}
  end
end

-- Brings a sliding window to the current sub-bucket (in memory; apply() writes it back).
-- Needs lim.vals = {head, total, value of the cell the current bucket maps to}.
-- Returns the cells that fall out and are not read yet, so the caller can fetch them in one go.
local function sliding_advance(lim)
  local n = lim.p2
  local head, total = tonumber(lim.vals[1]), tonumber(lim.vals[2]) or 0
  local cur = lim.cur
  if head == nil then head = cur end
  if head > cur then cur = head; lim.cur = cur end  -- clock stepped back: keep the newer bucket
  lim.head, lim.total, lim.clear, lim.clear_all = head, total, {}, false
  lim.cell = tonumber(lim.vals[3]) or 0
  if cur == head then return {} end
  if cur - head > n then
    lim.total, lim.cell, lim.clear_all = 0, 0, true
    return {}
  end
  -- cells of buckets head+1 .. cur now hold buckets that slid out of the window
  lim.total = total - lim.cell
  lim.cell = 0
  local missing = {}
  for b = head + 1, cur - 1 do
    local f = lim.lid .. ':' .. (b % (n + 1))
    lim.clear[#lim.clear + 1] = f
    missing[#missing + 1] = f
  end
  return missing
end

-- Loads and advances the state of every limit (in memory) and fills lim.used.
-- zcount: in-flight reservations not yet expired (only read when a limit needs it).
local function load_limits(K, Z, limits, now)
  local fields, owners = {}, {}
  for _, lim in ipairs(limits) do
    local f = base_fields(lim, now)
    lim.vals = {}
    for j = 1, #f do fields[#fields + 1] = f[j]; owners[#owners + 1] = {lim, j} end
  end
  if #fields > 0 then
    local got = redis.call('HMGET', K, unpack(fields))
    for j = 1, #fields do owners[j][1].vals[owners[j][2]] = got[j] end
  end
  local extra, extra_owner = {}, {}
  local inflight = nil
  for _, lim in ipairs(limits) do
    if lim.metric == 'n' then
      if inflight == nil then inflight = redis.call('ZCOUNT', Z, '(' .. int(now), '+inf') end
      lim.used = inflight
    elseif lim.algo == 's' then
      local missing = sliding_advance(lim)
      for j = 1, #missing do extra[#extra + 1] = missing[j]; extra_owner[#extra_owner + 1] = lim end
    elseif lim.algo == 'c' then
      local start, stop = nil, nil
      local prev = nil
      for b in string.gmatch(lim.p1, '[^,]+') do
        local v = tonumber(b)
        if prev ~= nil and prev <= now and now < v then start, stop = prev, v end
        prev = v
      end
      if start == nil then
        lim.stale, lim.used, lim.start, lim.stop = true, 0, now, now + 1
      else
        lim.start, lim.stop = start, stop
        lim.used = (tonumber(lim.vals[1]) == start) and (tonumber(lim.vals[2]) or 0) or 0
      end
    else
      local window, burst, rate = tonumber(lim.p1), lim.p2, lim.limit
      local level, ts = tonumber(lim.vals[1]), tonumber(lim.vals[2])
      if level == nil then level, ts = burst, now end
      if ts > now then ts = now end
      if level < burst then
        local add = math.floor((now - ts) * rate / window)
        if add > 0 then
          level = level + add
          -- advance the refill clock only by the time those whole units took: never generous
          ts = ts + math.ceil(add * window / rate)
        end
      end
      if level >= burst then level, ts = burst, now end
      lim.level, lim.ts = level, ts
      lim.used = burst - level
    end
  end
  if #extra > 0 then
    local got = redis.call('HMGET', K, unpack(extra))
    for j = 1, #extra do
      local lim = extra_owner[j]
      lim.total = lim.total - (tonumber(got[j]) or 0)
    end
  end
  for _, lim in ipairs(limits) do
    if lim.algo == 's' and lim.metric ~= 'n' then lim.used = lim.total end
  end
end

-- What a reply says of a limit: {remaining, ms until it is back to full}.
local function describe(lim, now)
  local remaining, reset = capacity_left(lim), 0
  if lim.metric == 'n' then
    reset = 0
  elseif lim.algo == 's' then
    -- the window is empty again once the newest non-empty sub-bucket slides out
    if lim.total > 0 then
      local newest = lim.cell > 0 and lim.cur or lim.head
      reset = (newest + lim.p2 + 1) * lim.w - now
    end
  elseif lim.algo == 'c' then
    reset = lim.stop - now
  elseif lim.level < lim.p2 then
    reset = math.ceil((lim.p2 - lim.level) * tonumber(lim.p1) / lim.limit)
  end
  if remaining < 0 then remaining = 0 end
  return remaining, reset
end


-- Adds delta (may be negative) to a loaded limit, in memory and in the write list `out`.
-- ref: the sub-bucket / period the delta belongs to (nil: the current one).
local function add_to_limit(lim, delta, ref, out)
  local lid = lim.lid
  if lim.algo == 's' then
    local n = lim.p2
    local target = ref or lim.cur
    if target < lim.cur - n then
      if delta < 0 then return end      -- that sub-bucket slid out: nothing to refund
      target = lim.cur                  -- an overrun is charged now, in full
    end
    lim.total = lim.total + delta
    lim.used = lim.total
    if target == lim.cur then
      lim.cell = lim.cell + delta
      lim.cell_written = true
      out[#out + 1] = lid .. ':' .. (target % (n + 1)); out[#out + 1] = int(lim.cell)
    else
      lim.cell_writes = lim.cell_writes or {}
      local f = lid .. ':' .. (target % (n + 1))
      lim.cell_writes[f] = (lim.cell_writes[f] or 0) + delta
    end
    lim.dirty = true
  elseif lim.algo == 'c' then
    if lim.stale then return end
    if ref ~= nil and ref ~= lim.start and (delta < 0 or ref > lim.start) then return end
    lim.used = lim.used + delta
    if lim.used < 0 then lim.used = 0 end
    out[#out + 1] = lid .. ':p'; out[#out + 1] = int(lim.start)
    out[#out + 1] = lid .. ':v'; out[#out + 1] = int(lim.used)
  else
    lim.level = lim.level - delta
    if lim.level > lim.p2 then lim.level = lim.p2 end
    lim.used = lim.p2 - lim.level
    out[#out + 1] = lid .. ':l'; out[#out + 1] = int(lim.level)
    out[#out + 1] = lid .. ':s'; out[#out + 1] = int(lim.ts)
  end
end

-- Writes what add_to_limit() collected, plus the housekeeping of advanced sliding windows.
local function write_limits(K, limits, out)
  local drop = {}
  for _, lim in ipairs(limits) do
    if lim.algo == 's' and lim.metric ~= 'n' and (lim.dirty or lim.cur ~= lim.head) then
      local n = lim.p2
      out[#out + 1] = lim.lid .. ':h'; out[#out + 1] = int(lim.cur)
      out[#out + 1] = lim.lid .. ':t'; out[#out + 1] = int(lim.total)
      if lim.cell_writes then
        for f, d in pairs(lim.cell_writes) do
          redis.call('HINCRBY', K, f, int(d))
        end
      end
      if lim.clear_all then
        for c = 0, n do
          if c ~= lim.cur % (n + 1) then drop[#drop + 1] = lim.lid .. ':' .. c end
        end
      else
        for _, f in ipairs(lim.clear) do drop[#drop + 1] = f end
      end
      if not lim.cell_written then
        out[#out + 1] = lim.lid .. ':' .. (lim.cur % (n + 1)); out[#out + 1] = int(lim.cell)
      end
    end
  end
  if #drop > 0 then redis.call('HDEL', K, unpack(drop)) end
  if #out > 0 then redis.call('HSET', K, unpack(out)) end
end

-- How long K must live so no limit forgets usage that still counts.
local function state_ttl(limits, now)
  local need = 1000
  for _, lim in ipairs(limits) do
    local t = 0
    if lim.metric == 'n' then t = 0
    elseif lim.algo == 's' then t = (lim.cur + lim.p2 + 1) * lim.w - now
    elseif lim.algo == 'c' then t = lim.stop - now
    else t = math.ceil((lim.p2 - lim.level) * tonumber(lim.p1) / lim.limit) end
    if t > need then need = t end
  end
  return need
end

-- Extends K's TTL when it would run out before `need`; with some slack, so a busy subject does
-- not pay a PEXPIRE on every call.
local function keep_alive(K, need)
  local left = redis.call('PTTL', K)
  if left >= 0 and left >= need then return end
  if left == -2 then return end  -- K holds nothing yet (nothing was written)
  redis.call('PEXPIRE', K, int(need + math.floor(need / 8) + 1000))
end

-- Milliseconds until `need` more units fit in a loaded limit; -1 when they never can.
local function retry_after(K, Z, lim, need, now)
  if lim.metric == 'n' then
    local first = redis.call('ZRANGEBYSCORE', Z, '(' .. int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if #first == 0 then return 0 end
    -- a commit or release may free the slot before it expires: ask again within a second
    return math.min(1000, tonumber(first[2]) - now)
  end
  if need > capacity(lim) then return -1 end
  if lim.algo == 'c' then return lim.stop - now end
  if lim.algo == 'b' then
    return math.max(1, math.ceil((need - lim.level) * tonumber(lim.p1) / lim.limit))
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
      if freed >= excess then return (lim.cur - n + j - 1 + n + 1) * lim.w - now end
    end
  end
  return (lim.cur + n + 1) * lim.w - now
end
