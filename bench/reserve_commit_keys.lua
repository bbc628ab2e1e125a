-- wrk script for bench/http_keys_bench.py: like reserve_commit.lua (reserve, then commit the
-- reservation it got), with the caller named either by an API key from a file or as a user.
-- Arguments (after --): "keys" PATH (one key a line) or "users" N; both rotate through N callers.
local counter = 0
local pending = {}
local callers = {}
local mode = "users"
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function init(args)
  mode = args[1] or "users"
  if mode == "keys" then
    for line in io.lines(args[2]) do callers[#callers + 1] = line end
  else
    for i = 1, tonumber(args[2] or "100") do callers[i] = "bench-" .. i end
  end
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
  local who = callers[(counter + (tid or 0) * 7919) % #callers + 1]
  local identity
  if mode == "keys" then
    identity = '"api_key":"' .. who .. '"'
  else
    identity = '"user":"' .. who .. '","tier":"bench"'
  end
  return wrk.format("POST", "/v1/reserve", {["Content-Type"] = "application/json"},
    '{' .. identity .. ',"model":"gpt-4o","prompt":"' .. prompt .. '","max_output_tokens":256}')
end

function response(status, headers, body)
  local rid = string.match(body, '"reservation_id":"([^"]+)"')
  if rid then pending[#pending + 1] = rid end
end
