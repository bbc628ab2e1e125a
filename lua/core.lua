-- core.lua: what every part of ratelimitd's Redis function library shares.
--
-- The library is built (ratelimitd/quota/library.py) from these files, in this order: the
-- constants generated from ratelimitd/quota/wire.py (codes, modes, statuses, packed formats,
-- reply fields), core.lua, sliding.lua, calendar.lua, bucket.lua, limits.lua, record.lua,
-- block.lua, alerts.lua, anomaly.lua, then reserve.lua and settle.lua, each registered as a
-- function. Every call is one atomic FCALL over the keys of one hash slot.
--
-- Build rules (the builder refuses a library that breaks them):
--   * `local NAME, ... = 1, ...` at the start of a line, UPPERCASE names and whole numbers,
--     declares constants; the builder writes each use as its number (Lua reads an outer local
--     as an upvalue, one instruction more per use) and comments the declaration out;
--   * constant names are unique across the whole library, and no local, parameter or loop
--     variable may reuse one (it would be rewritten as a number);
--   * no long brackets ([[ ]], --[[ ]]): the builder reads comments and strings line by line.
--
-- Units: every amount is an integer (requests, tokens, cost in nano-USD); times are integer ms of
-- Redis server time (TIME), unless a test-built engine passes an explicit clock.
--
-- Speed matters here: every model call runs a reserve and a commit. What costs most in Redis'
-- Lua is parsing numbers from strings (strtod), building and growing tables, and formatting
-- numbers, so arguments, state and replies are packed binary (struct, in C), a loaded limit is
-- an array with named entries, a call reads and writes one small hash field per limit (one
-- HMGET, one HSET), and older sub-buckets are touched only when a window moves on.
-- docs/performance.md has the measurements.
--
-- Limit state lives in the subject hash K, one field per limit named by the limit's id (lid,
-- 8 chars), packed (the layout of each algorithm is atop its file). The first call writes
-- these fields first, and a small hash scans its fields in order, so they stay quick to find
-- however many sub-bucket fields follow. K's field `x` is DOUBLE(the expiry K was last given),
-- so most calls skip PEXPIRE; `b` a block (block.lua), `a` the cost alerts fired (alerts.lua),
-- `n` the anomaly state (anomaly.lua).

-- Redis runs a library's top level without globals, so bind_globals() binds these on the first
-- call (to the same values every time).
local tonumber, ipairs, unpack, floor, ceil, max, min, spack, sunpack, srep, sformat
local function bind_globals()
  if floor then return end
  tonumber, ipairs, unpack = _G.tonumber, _G.ipairs, _G.unpack
  floor, ceil, max, min = _G.math.floor, _G.math.ceil, _G.math.max, _G.math.min
  spack, sunpack, srep = _G.struct.pack, _G.struct.unpack, _G.string.rep
  sformat = _G.string.format
end

-- The entries of a loaded limit (an array), common to every algorithm: LID, ALGO, METRIC,
-- CAP (capacity in its own metric; a token bucket holds up to its burst), USED (of CAP, as
-- loaded and changed). Each algorithm's file names the entries from 6 on.
local LID, ALGO, METRIC, CAP, USED = 1, 2, 3, 4, 5

-- Limits of one subject a call can carry, and the size of a small array (see array8)
local MAX_LIMITS = 8
-- K lives at least this long after a write, and a busy subject's PEXPIRE is renewed only
-- once 1/EXPIRY_SLACK_DIVISOR of its life is used up: a PEXPIRE per call costs a command.
local MIN_KEY_TTL_MS, EXPIRY_SLACK_DIVISOR = 1000, 8
-- Microseconds per millisecond (TIME answers seconds and microseconds); nano-USD per
-- micro-USD per 1M tokens times a token (prices are micro-USD per 1M tokens)
local US_PER_MS, PRICE_DIVISOR = 1000, 1000

-- A whole number as a Redis argument. redis.call formats a number with printf('%.17g'),
-- slowly; a whole number's digits are the same text, and those of small ones are kept once
-- made. Anything else is left to redis.call.
local INT_TEXT_KEPT = 4096
local INT_TEXT = {}
local function int_text(v)
  local s = INT_TEXT[v]
  if s then return s end
  if v ~= floor(v) or v >= 1e15 or v <= -1e15 then return v end
  s = sformat('%d', v)
  if v < INT_TEXT_KEPT and v > -INT_TEXT_KEPT then INT_TEXT[v] = s end
  return s
end

-- A lifetime (whole ms) as a Redis argument: int_text's, kept for any value, since a daemon
-- sends the same few lifetimes call after call; at most MS_TEXTS_KEPT, then the set starts over.
local MS_TEXTS_KEPT = 64
local MS_TEXT, nms_text = {}, 0
local function ms_text(ms)
  local s = MS_TEXT[ms]
  if s then return s end
  if nms_text >= MS_TEXTS_KEPT then MS_TEXT, nms_text = {}, 0 end
  s = int_text(ms)
  MS_TEXT[ms], nms_text = s, nms_text + 1
  return s
end

local function now_ms(override)
  if override > 0 then return override end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / US_PER_MS)
end

-- What a call counts in each metric, indexed by metric code: requests, tokens, input and
-- output tokens, cost (nano-USD, rounded up), and in-flight calls (1 while the call holds a
-- concurrency slot; settle counts 0 once it ends).
-- Written into `t` (a table of the caller's, reused call after call: a table per call costs
-- its allocation and its share of Lua's garbage collection).
local function amounts(t, requests, input, cached, output, pi, pc, po, inflight)
  t[1], t[2], t[3], t[4], t[6] = requests, input + output, input, output, inflight
  t[5] = ceil(((input - cached) * pi + cached * pc + output * po) / PRICE_DIVISOR)
  return t
end
-- Tables for amounts(): what a call reserves, and what it used
local RESERVED_AMOUNTS, USED_AMOUNTS = {0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}

-- New arrays with room for 8 or 16 values. Lua grows a table by reallocating it, a good share
-- of a call's time, so arrays filled in a loop start here (and are read with unpack(t, 1, n)).
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
