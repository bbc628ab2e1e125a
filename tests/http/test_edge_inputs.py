"""Odd but real inputs get right answers: null attributes, malformed
messages named by their path, output caps below the minimum, HEAD on the probes, calls that
can never fit, headers at the largest quotas, and chat requests with tools and images."""

from __future__ import annotations

from typing import Any

import http_sf
import pytest
from redis.asyncio import Redis

from ratelimitd.tokenize import TokenCounter
from tests.support.http import SMALL_TIER, Serve, assert_error, call, limit_of, rq, small

DEVICE_LIMIT = {"name": "per_device", "scope": "device", "metric": "requests", "window": "60s",
                "limit": 5}


async def test_a_null_attribute_is_absent_not_a_shared_empty_bucket(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve({**small(limits=[DEVICE_LIMIT]), "attributes": {"names": ["device"]}})
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, attributes={"device": None}))
    assert resp.status == 200, body
    assert "per_device" not in {lim["name"] for lim in body["limits"]}
    assert [k for k in await redis_client.keys("*") if b"device:" in k] == []
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, attributes={"device": "d1"}))
    assert limit_of(body, "per_device")["remaining"] == 4


@pytest.mark.parametrize(("messages", "path"), [
    ([{"role": "user", "content": 42}], "messages[0].content must be a string or a list"),
    ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
     "messages[0].content[0].text must be a string"),
])
async def test_malformed_content_is_named_not_called_empty(
        serve: Serve, messages: Any, path: str) -> None:
    client = await serve(small())
    resp, body = await call(client, "/v1/reserve", rq(messages=messages))
    assert_error(resp, body, 400, "invalid_request", path)


async def test_an_assistant_message_with_only_a_function_call_is_counted(serve: Serve) -> None:
    client = await serve(small())
    messages = [{"role": "assistant", "content": None,
                 "function_call": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]
    resp, body = await call(client, "/v1/reserve", rq(messages=messages))
    assert resp.status == 200, body
    assert body["input_tokens"] == TokenCounter().count_messages("gpt-4o", messages)


async def test_errors_name_the_full_path_of_an_attribute(serve: Serve) -> None:
    client = await serve(small())
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, attributes={"device": 7}))
    assert_error(resp, body, 400, "invalid_request", "attributes.device:")


async def test_output_caps_below_the_minimum_are_granted_as_asked_and_zero_is_refused(
        serve: Serve) -> None:
    client = await serve(small())
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, max_output_tokens=5))
    assert resp.status == 200 and body["max_output_tokens"] == 5, body
    for field in ("max_output_tokens", "min_output_tokens"):
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, **{field: 0}))
        assert_error(resp, body, 400, "invalid_request", field, "between 1 and")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
async def test_head_on_the_probes_answers_like_get_without_a_body(serve: Serve,
                                                                   path: str) -> None:
    client = await serve()
    resp = await client.head(path)
    assert resp.status == 200
    assert await resp.read() == b""


async def test_headers_parse_strictly_at_the_largest_quotas_config_accepts(
        serve: Serve) -> None:
    client = await serve({"tiers": {"t": {"limits": [
        {"name": "huge_tokens", "scope": "user", "metric": "tokens", "window": "24h",
         "limit": 10**15},
        {"name": "huge_budget", "scope": "user", "metric": "cost_usd", "window": "month",
         "limit": 10_000_000.0},
        {"name": "huge_bucket", "scope": "user", "metric": "requests", "window": "1s",
         "limit": 10**15, "algorithm": "token_bucket", "burst": 10**15}]}}})
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 200, body
    policy = http_sf.parse(resp.headers["RateLimit-Policy"].encode(), tltype="list")
    state = http_sf.parse(resp.headers["RateLimit"].encode(), tltype="list")
    quotas = {name: params["q"] for name, params in policy}
    assert quotas == {"huge_tokens": 999_999_999_999_999, "huge_budget": 999_999_999_999_999,
                      "huge_bucket": 999_999_999_999_999}
    assert all(0 <= params["r"] <= 999_999_999_999_999 for _, params in state)


async def test_a_chat_request_with_tools_tool_calls_and_an_image_is_counted(
        serve: Serve) -> None:
    client = await serve(small(tokens_per_day=100_000, daily_budget_usd=10.0))
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "Is it sunny here?"},
            {"type": "image_url", "image_url": {"url": "https://x/sky.png", "width": 1024,
                                                "height": 1024}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"}]
    resp, body = await call(client, "/v1/reserve", rq(messages=messages, tools=tools,
                                                       max_output_tokens=100))
    assert resp.status == 200, body
    expected = TokenCounter().count_messages("gpt-4o", messages, tools)
    text_only = TokenCounter().count_messages("gpt-4o", [
        {"role": "user", "content": "Is it sunny here?"}])
    assert body["input_tokens"] == expected > text_only + 765   # the image alone is 765
    resp, body = await call(client, "/v1/reserve", rq(prompt="hi", tools=tools))
    assert_error(resp, body, 400, "invalid_request", "tools: only with messages")


def _nested_lists(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def _nested_properties(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": {"q": {"oneOf": _nested_lists(255)}}},
    {"type": "object", "x-extra": _nested_lists(600)},
    _nested_properties(255),
    {"type": "object", "properties": {"q": {"description": "untyped",
                                            "items": _nested_lists(300)}}},
], ids=["unknown-key-255", "unknown-key-600", "properties-255", "untyped-300"])
async def test_tool_parameters_nested_too_deep_answer_400_and_charge_nothing(
        serve: Serve, parameters: dict[str, Any]) -> None:
    client = await serve(small())
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    messages = [{"role": "user", "content": "hi"}]
    resp, body = await call(client, "/v1/reserve", rq(messages=messages, tools=tools,
                                                      max_output_tokens=10))
    assert_error(resp, body, 400, "invalid_request", "tools[0].function.parameters",
                 "levels deep")
    # nothing was charged: the first request that is counted sees the whole minute
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, max_output_tokens=10))
    assert resp.status == 200, body
    per_minute = SMALL_TIER["requests_per_minute"]
    assert limit_of(body, "requests_per_minute")["remaining"] == per_minute - 1
