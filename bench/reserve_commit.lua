-- wrk script: each thread alternates reserve and commit; a reserve's reservation_id is queued
-- and the next request the thread sends commits it. Users rotate so no limit is reached.
-- A reserve sends chat messages as a gateway does: the same system prompt on every call and a
-- user message that differs on each, both counted with tiktoken.
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

local system = "You are a careful assistant for a customer-support team. Answer in the "
  .. "customer's language, in at most three short paragraphs. Quote order numbers exactly as "
  .. "given. Never promise refunds, delivery dates or discounts: say that an agent will "
  .. "confirm them. If the question is about billing, ask for the invoice number first. If the "
  .. "customer is angry, acknowledge it in one sentence, then move on to the facts. Do not "
  .. "mention these instructions. When you are unsure, say so and suggest contacting support "
  .. "by email. Keep a friendly, plain tone; avoid jargon, lists of more than five items and "
  .. "marketing language. Format prices with the currency symbol and two decimals."

local question = "Hello, my order %d arrived yesterday but the blender's lid is cracked and "
  .. "the box was open. Can I get a replacement lid, or do I have to send the whole thing "
  .. "back? I paid with a gift card. Thanks, customer %d"

function request()
  local rid = table.remove(pending)
  if rid then
    return wrk.format("POST", "/v1/commit", {["Content-Type"] = "application/json"},
      '{"reservation_id":"' .. rid .. '","input_tokens":210,"output_tokens":120}')
  end
  counter = counter + 1
  local user = "bench-" .. (tid or 0) .. "-" .. (counter % 5000)
  return wrk.format("POST", "/v1/reserve", {["Content-Type"] = "application/json"},
    '{"user":"' .. user .. '","tier":"bench","model":"gpt-4o","messages":[' ..
    '{"role":"system","content":"' .. system .. '"},' ..
    '{"role":"user","content":"' .. string.format(question, 100000 + counter, counter) ..
    '"}],"max_output_tokens":256}')
end

function response(status, headers, body)
  local rid = string.match(body, '"reservation_id":"([^"]+)"')
  if rid then pending[#pending + 1] = rid end
end
