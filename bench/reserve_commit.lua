-- wrk script: each thread alternates reserve and commit; a reserve's reservation_id is queued
-- and the next request the thread sends commits it. Users rotate so no limit is reached.
local counter = 0
local pending = {}
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function init(args)
  math.randomseed(os.time() + (tid or 0))
end

local prompt = "Summarize the following paragraph in two sentences: rate limits protect an "
  .. "LLM API from runaway cost, because one call can cost a thousand times a normal one."

function request()
  local rid = table.remove(pending)
  if rid then
    return wrk.format("POST", "/v1/commit", {["Content-Type"] = "application/json"},
      '{"reservation_id":"' .. rid .. '","input_tokens":40,"output_tokens":120}')
  end
  counter = counter + 1
  local user = "bench-" .. (tid or 0) .. "-" .. (counter % 5000)
  return wrk.format("POST", "/v1/reserve", {["Content-Type"] = "application/json"},
    '{"user":"' .. user .. '","tier":"bench","model":"gpt-4o","prompt":"' .. prompt ..
    '","max_output_tokens":256}')
end

function response(status, headers, body)
  local rid = string.match(body, '"reservation_id":"([^"]+)"')
  if rid then pending[#pending + 1] = rid end
end
