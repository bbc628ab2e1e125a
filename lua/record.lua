-- record.lua: the reservation record R, kept beside the subject hash in its hash slot.
--
-- R = RECORD(state, expires, input, output, prices, actual usage, attempt, n), then for each of the
-- n charged limits the sub-bucket or period it charged (a double), then the limit specs as the
-- reserve got them, then the other subjects (the rest). The amounts charged follow from the record
-- (input, output, prices), so they are not kept. A settled record keeps no charges: it only answers
-- repeats. `attempt` names the reserve attempt that wrote the record: cancelling that attempt
-- (settle's MODE_CANCEL) refunds it, and a cancel that runs first leaves a released record with
-- that attempt, which the attempt's late reserve finds and then charges nothing. A record outlives
-- its expiry by the commit grace, so a late commit still charges the actual usage. A settled record
-- keeps, after the other subjects and RECORD_ALERTS_SEPARATOR, the alerts its commit fired
-- (comma-joined JSON), so a repeated commit answers them again. (Layout: RECORD in
-- ratelimitd/quota/wire.py, docs/wire.md.)

local RECORDS = {}
-- The sub-bucket or period each limit of a reserve charged, for its record: one table for
-- every call (Redis runs one at a time), read up to the call's limit count
local RESERVE_REFS = array8()
-- A settle's change of each limit, and whether it leaves the limit as it is (settle.lua): one
-- table each for every call, read up to the call's limit count
local SETTLE_DELTAS, SETTLE_UNUSED = array8(), array8()
-- The charges a record lists, when at most MAX_LIMITS (parse_record; then what follows
-- them): one table for every call
local RECORD_REFS = array8()
local function record_format(n)   -- RECORD and n charges, built once per n
  local f = RECORDS[n]
  if not f then f = RECORD_FORMAT .. srep('d', n); RECORDS[n] = f end
  return f
end

-- A record's RECORD part: a settled record is only this; a resized one keeps what followed it.
local function record(state, expires, input, output, pi, pc, po, u_in, u_cached, u_out,
                      attempt, n)
  return spack(RECORD_FORMAT, state, expires, input, output, pi, pc, po, u_in, u_cached, u_out,
               attempt, n)
end

-- RECORD's fields, and where the attempt is among them
local RECORD_FIELDS, RECORD_ATTEMPT_FIELD = 12, 11

-- The same record, now of another reserve attempt (an idempotent retry took it over).
local function record_of_attempt(raw, attempt)
  local f = {sunpack(RECORD_FORMAT, raw)}
  f[RECORD_ATTEMPT_FIELD] = attempt
  return spack(RECORD_FORMAT, unpack(f, 1, RECORD_FIELDS)) .. raw:sub(RECORD_SIZE + 1)
end

-- The parsed record: one table for every call, each parse sets every entry (Redis runs one
-- call at a time, and a call parses one record)
local PARSED_RECORD = {state = false, expires = 0, input = 0, output = 0, pi = 0, pc = 0,
                       po = 0, actual = {0, 0, 0}, attempt = 0, charges = false,
                       fields = false, refs = false, others = false, raw = false,
                       alerts = false}

local function parse_record(raw)
  local state, expires, input, output, pi, pc, po, ui, uc, uo, attempt, n =
    sunpack(RECORD_FORMAT, raw)
  local specs_at = RECORD_SIZE + DOUBLE_SIZE * n + 1
  local rec, actual = PARSED_RECORD, PARSED_RECORD.actual
  rec.state, rec.expires, rec.input, rec.output = state, expires, input, output
  rec.pi, rec.pc, rec.po, rec.attempt = pi, pc, po, attempt
  actual[1], actual[2], actual[3] = ui, uc, uo
  rec.charges, rec.fields, rec.refs, rec.alerts = false, false, false, false
  rec.others, rec.raw = raw:sub(specs_at + SPEC_SIZE * n), raw
  if n > 0 then
    -- the specs as the reserve got them: most likely parsed already
    rec.charges, rec.fields = limits_of(raw:sub(specs_at, specs_at + SPEC_SIZE * n - 1))
    local refs = RECORD_REFS
    if n > MAX_LIMITS then
      refs = {sunpack(doubles(n), raw, RECORD_SIZE + 1)}
    else
      refs[1], refs[2], refs[3], refs[4], refs[5], refs[6], refs[7], refs[8] =
        sunpack(doubles(n), raw, RECORD_SIZE + 1)
    end
    rec.refs = refs
  elseif rec.state ~= RECORD_RESERVED then
    -- a settled record: the alerts its commit fired follow the other subjects
    local cut = rec.others:find(RECORD_ALERTS_SEPARATOR, 1, true)
    if cut then rec.others, rec.alerts = rec.others:sub(1, cut - 1), rec.others:sub(cut + 1) end
  end
  return rec
end

-- A settle's reply about `rec` (settle.lua): the usage its commit recorded, what it reserved, and
-- for a resize its limits; then the other subjects and the alerts its commit fired. `actual`
-- and `reserved`: the record's amounts (amounts()) when the caller has them, or nil.
local function settled_reply(rec, now, status, limits, actual, reserved)
  local u1, u2, u3 = 0, 0, 0
  if rec.state == RECORD_COMMITTED then u1, u2, u3 = unpack(rec.actual, 1, 3) end
  if not actual then
    actual = amounts(USED_AMOUNTS, 1, u1, u2, u3, rec.pi, rec.pc, rec.po, 0)
    reserved = amounts(RESERVED_AMOUNTS, 1, rec.input, 0, rec.output, rec.pi, rec.pi, rec.po, 1)
  end
  local head = reply_head()
  head[SETTLED_STATUS], head[SETTLED_INPUT_TOKENS] = status, u1
  head[SETTLED_CACHED_INPUT_TOKENS], head[SETTLED_OUTPUT_TOKENS] = u2, u3
  head[SETTLED_COST_NANO] = actual[METRIC_COST_USD]
  head[SETTLED_RESERVED_TOKENS] = reserved[METRIC_TOKENS]
  head[SETTLED_RESERVED_COST_NANO] = reserved[METRIC_COST_USD]
  return packed_reply(limits, now, rec.others, head, rec.alerts and {rec.alerts})
end
