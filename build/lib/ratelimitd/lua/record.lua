-- record.lua: the reservation record R, kept beside the subject hash in its hash slot.
--
-- R = RECORD(state, expires, input, output, prices, actual usage, attempt, n), then for each of the n
-- charged limits the sub-bucket or period it charged (a double), then the limit specs as the
-- reserve got them, then the other subjects (the rest). The amounts charged follow from the
-- record (input, output, prices), so they are not kept. A settled record keeps no charges: it
-- only answers repeats. `attempt` names the reserve attempt that wrote the record: cancelling
-- that attempt (settle's MODE_CANCEL) refunds it, and a cancel that runs first leaves a released
-- record with that attempt, which the attempt's late reserve finds and then charges nothing.
-- A record outlives its expiry by the commit grace, so a late commit still charges the actual
-- usage. (Layout: RECORD in ratelimitd/quota/wire.py, docs/wire.md.)

local RECORDS = {}
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

local function parse_record(raw)
  local state, expires, input, output, pi, pc, po, ui, uc, uo, attempt, n =
    sunpack(RECORD_FORMAT, raw)
  local specs_at = RECORD_SIZE + DOUBLE_SIZE * n + 1
  local rec = {state = state, expires = expires, input = input, output = output,
               pi = pi, pc = pc, po = po, actual = {ui, uc, uo}, attempt = attempt,
               charges = false, fields = false, others = raw:sub(specs_at + SPEC_SIZE * n),
               raw = raw}
  if n > 0 then
    -- the specs as the reserve got them: most likely parsed already
    rec.charges, rec.fields = limits_of(raw:sub(specs_at, specs_at + SPEC_SIZE * n - 1))
    local refs = {sunpack(doubles(n), raw, RECORD_SIZE + 1)}
    for k = 1, n do rec.charges[k][REF] = refs[k] end
  end
  return rec
end
