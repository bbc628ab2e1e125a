"""POST /v1/reserve: allowed, denied, the output cap, counting messages."""

from __future__ import annotations

import time
from typing import Any

import pytest
import tiktoken
from redis.asyncio import Redis

from tests.support.http import (
    RESERVE_KEYS,
    Serve,
    assert_error,
    call,
    charged_keys,
    cookbook_count,
    cost_nano,
    go_duration_ms,
    limit_of,
    nano,
    o200k,
    parse_sf_list,
    rq,
    seconds_up,
    small,
    snapshot,
)

# -- POST /v1/reserve: allowed ----------------------------------------------------------------

async def test_reserve_allowed_answer_on_the_seed_free_tier(serve: Serve) -> None:
    client = await serve()
    prompt = "Summarise the plot of Hamlet in two sentences."
    started_ms = time.time() * 1000
    resp, body = await call(client, "/v1/reserve",
                            {"user": "alice", "tier": "free", "model": "gpt-4o",
                             "prompt": prompt})
    assert resp.status == 200, body
    assert resp.content_type == "application/json"
    assert set(body) == RESERVE_KEYS
    n_in = len(o200k().encode(prompt))
    assert body["allowed"] is True
    assert body["reservation_id"].startswith("rsv_")
    assert body["duplicate"] is False
    assert body["warnings"] == []
    # reservations live [reservations] ttl_s = 300 s by default, on Redis time (same host)
    assert started_ms + 295_000 < body["expires_at_ms"] < time.time() * 1000 + 305_000
    assert body["input_tokens"] == n_in
    assert body["max_output_tokens"] == 500                      # the free tier's cap
    est = cost_nano(n_in, 500, pi=2.5, po=10.0)
    assert body["reserved"] == {"requests": 1, "tokens": n_in + 500,
                                "cost_usd": est / 1e9}
    assert [(lim["name"], lim["scope"], lim["metric"], lim["window"], lim["limit"])
            for lim in body["limits"]] == [
        ("requests_per_minute", "user", "requests", "60s", 10),
        ("tokens_per_day", "user", "tokens", "24h", 10_000),
        ("daily_budget_usd", "user", "cost_usd", "day", 1.0),
        ("max_concurrent", "user", "concurrent", None, 2),
    ]
    remaining = {lim["name"]: lim["remaining"] for lim in body["limits"]}
    assert remaining["requests_per_minute"] == 9
    assert remaining["tokens_per_day"] == 10_000 - n_in - 500
    assert nano(remaining["daily_budget_usd"]) == 1_000_000_000 - est
    assert remaining["max_concurrent"] == 1
    resets = {lim["name"]: lim["reset_ms"] for lim in body["limits"]}
    assert 0 < resets["requests_per_minute"] <= 61_000
    assert 0 < resets["tokens_per_day"] <= 86_400_000 + 1_440_000
    assert 0 < resets["daily_budget_usd"] <= 86_400_000
    assert resets["max_concurrent"] == 0


def check_headers_match_limits(headers: Any, body: dict[str, Any]) -> None:
    """IETF RateLimit-Policy / RateLimit and OpenAI x-ratelimit-* say what the JSON says."""
    policy = parse_sf_list(headers["RateLimit-Policy"])
    current = parse_sf_list(headers["RateLimit"])
    assert list(policy) == list(current) == [lim["name"] for lim in body["limits"]]
    windows = {"60s": 60, "24h": 86_400, "day": 86_400, "1h": 3600, None: None}
    units = {"requests": "requests", "tokens": "tokens", "cost_usd": "nano-usd",
             "concurrent": "concurrent-requests"}
    for lim in body["limits"]:
        money = lim["metric"] == "cost_usd"
        quota = nano(lim["limit"]) if money else lim["limit"]
        left = nano(lim["remaining"]) if money else lim["remaining"]
        p = policy[lim["name"]]
        assert p["q"] == quota, (lim, p)
        assert p.get("w") == windows[lim["window"]], (lim, p)
        assert p["qu"] == units[lim["metric"]]
        assert current[lim["name"]] == {"r": left, "t": seconds_up(lim["reset_ms"])}
    for suffix, metric in (("requests", "requests"), ("tokens", "tokens")):
        lims = [lim for lim in body["limits"] if lim["metric"] == metric]
        tightest = min(lims, key=lambda lim: lim["remaining"])
        assert headers[f"x-ratelimit-limit-{suffix}"] == str(tightest["limit"])
        assert headers[f"x-ratelimit-remaining-{suffix}"] == str(tightest["remaining"])
        reset = tightest["reset_ms"]
        expected = reset if reset < 1000 else seconds_up(reset) * 1000
        assert go_duration_ms(headers[f"x-ratelimit-reset-{suffix}"]) == expected


async def test_reserve_allowed_headers_match_the_limits(serve: Serve) -> None:
    client = await serve()
    for _ in range(2):
        resp, body = await call(client, "/v1/reserve",
                                {"user": "alice", "tier": "free", "model": "gpt-4o",
                                 "input_tokens": 1000})
        assert resp.status == 200, body
    check_headers_match_limits(resp.headers, body)
    assert resp.headers["x-ratelimit-remaining-requests"] == "8"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 2 * 1500)
    assert "Retry-After" not in resp.headers


# -- POST /v1/reserve: denied -----------------------------------------------------------------

async def test_denied_answers_429_with_retry_after_and_headers(serve: Serve,
                                                               redis_client: Redis) -> None:
    client = await serve(small(requests_per_minute=2))
    for _ in range(2):
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=100))
        assert resp.status == 200, body
    before = await snapshot(redis_client)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=100))
    assert resp.status == 429, body
    assert set(body) == {"allowed", "reason", "retry_after_ms", "limits"}
    assert body["allowed"] is False
    assert body["reason"] == "requests_per_minute"
    retry = body["retry_after_ms"]
    assert isinstance(retry, int) and 0 < retry <= 61_000
    assert resp.headers["Retry-After"] == str(seconds_up(retry))
    assert int(resp.headers["Retry-After"]) * 1000 >= retry        # rounded up, never down
    # the limits show the state without the denied call: nothing was reserved for it
    assert limit_of(body, "requests_per_minute")["remaining"] == 0
    assert limit_of(body, "tokens_per_day")["remaining"] == 2000 - 2 * 400
    assert limit_of(body, "max_concurrent")["remaining"] == 1
    check_headers_match_limits(resp.headers, body)
    assert resp.headers["x-ratelimit-limit-requests"] == "2"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert await snapshot(redis_client) == before


async def test_a_call_that_can_never_fit_is_400_exceeds_limit_naming_the_limit(
        serve: Serve, redis_client: Redis) -> None:
    """Not a 429: no wait admits it, and the contract's 429 always has a Retry-After."""
    client = await serve(small(tokens_per_day=1000))
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=5000))
    assert_error(resp, body, 400, "exceeds_limit", "tokens_per_day", "1000 tokens per 24h",
                 "retrying will not help")
    assert "Retry-After" not in resp.headers
    assert await charged_keys(redis_client) == []


async def test_concurrency_slots_deny_then_free_on_commit_and_release(serve: Serve) -> None:
    client = await serve(small(max_concurrent=2))
    ids = []
    for _ in range(2):
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, body
        ids.append(body["reservation_id"])
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 429 and body["reason"] == "max_concurrent", body
    # truthful: a slot frees on commit or release, at the latest when a reservation expires
    # (ttl_s = 300, plus one sub-bucket): an obedient client waits that long, not 1 s forever
    assert body["retry_after_ms"] == 305_000
    assert resp.headers["Retry-After"] == "305"
    assert "committed or released" in body["message"]
    resp, _ = await call(client, "/v1/commit", {"reservation_id": ids[0], "input_tokens": 10,
                                               "output_tokens": 5})
    assert resp.status == 200
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 200, body
    assert limit_of(body, "max_concurrent")["remaining"] == 0
    resp, _ = await call(client, "/v1/release", {"reservation_id": ids[1]})
    assert resp.status == 200
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 200, body


# -- the clamp of max_output_tokens ------------------------------------------------------------

async def test_requested_output_above_the_tier_cap_gets_the_tier_cap(serve: Serve) -> None:
    client = await serve(small(max_output_tokens=300))
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10, max_output_tokens=10_000))
    assert resp.status == 200, body
    assert body["max_output_tokens"] == 300
    assert body["reserved"]["tokens"] == 310
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10, max_output_tokens=120))
    assert body["max_output_tokens"] == 120                       # a lower request is kept
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert body["max_output_tokens"] == 300                       # default: the tier's


async def test_output_is_clamped_to_what_the_token_budget_still_allows(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(small(tokens_per_day=1000, max_output_tokens=500))
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=300))
    assert resp.status == 200 and body["max_output_tokens"] == 500     # 800 of 1000 reserved
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=100))
    assert resp.status == 200, body
    assert body["max_output_tokens"] == 100                             # 200 left - 100 input
    assert body["reserved"]["tokens"] == 200
    assert limit_of(body, "tokens_per_day")["remaining"] == 0
    assert body["reserved"]["cost_usd"] == cost_nano(100, 100, pi=2.5, po=10.0) / 1e9


async def test_output_is_clamped_to_what_the_cost_budget_still_allows(serve: Serve) -> None:
    # $0.01 a day at $3 / $15 per 1M: 1000 input tokens cost $0.003, leaving room for
    # floor(0.007 / 0.000015) = 466 output tokens
    client = await serve({"tiers": {"t": {"daily_budget_usd": 0.01, "max_output_tokens": 4000}},
                          "pricing": {"default": {"input": 3.0, "output": 15.0}}})
    resp, body = await call(client, "/v1/reserve",
                            {"user": "u1", "tier": "t", "model": "some-model",
                             "input_tokens": 1000})
    assert resp.status == 200, body
    assert body["max_output_tokens"] == 466
    reserved = cost_nano(1000, 466, pi=3.0, po=15.0)
    assert nano(body["reserved"]["cost_usd"]) == reserved <= 10_000_000
    assert nano(limit_of(body, "daily_budget_usd")["remaining"]) == 10_000_000 - reserved


async def test_denied_when_not_even_min_output_tokens_fits(serve: Serve,
                                                           redis_client: Redis) -> None:
    client = await serve(small(tokens_per_day=1000, max_output_tokens=500))
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=400))
    assert resp.status == 200 and body["max_output_tokens"] == 500     # 900 reserved
    before = await snapshot(redis_client)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=90))  # room for 10 < 16
    assert resp.status == 429, body
    assert body["reason"] == "tokens_per_day"
    assert limit_of(body, "tokens_per_day")["remaining"] == 100
    assert await snapshot(redis_client) == before
    # a caller that can live with fewer says so
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=90, min_output_tokens=8))
    assert resp.status == 200, body
    assert body["max_output_tokens"] == 10


# -- messages are counted as tiktoken counts them ---------------------------------------------

CHAT = [
    {"role": "system", "content": "You are a helpful assistant that answers in French."},
    {"role": "user", "name": "alice", "content": "How many legs does a spider have?"},
    {"role": "assistant", "content": "Une araignée a huit pattes. 🕷️"},
    {"role": "user", "name": "alice",
     "content": "And an ant? Answer with one word, s'il te plaît."},
]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "gpt-3.5-turbo"])
async def test_messages_count_equals_the_cookbook_count_with_tiktoken(serve: Serve,
                                                                     model: str) -> None:
    client = await serve({"tiers": {"t": {"max_output_tokens": 100}}})
    resp, body = await call(client, "/v1/reserve",
                            {"user": "u1", "tier": "t", "model": model, "messages": CHAT})
    assert resp.status == 200, body
    expected = cookbook_count(model, CHAT)
    assert body["input_tokens"] == expected
    assert body["reserved"]["tokens"] == expected + 100


async def test_prompt_count_follows_the_model_encoding(serve: Serve) -> None:
    client = await serve({"tiers": {"t": {"max_output_tokens": 100}}})
    prompt = "Ünïcödé text, numbers 1234567 and code: def f(x): return x ** 2  # 🚀"
    counts = {}
    for model in ("gpt-4o", "gpt-4"):
        resp, body = await call(client, "/v1/reserve",
                                {"user": "u1", "tier": "t", "model": model, "prompt": prompt})
        assert resp.status == 200, body
        counts[model] = body["input_tokens"]
        assert counts[model] == len(tiktoken.encoding_for_model(model).encode(prompt))
    assert counts["gpt-4o"] != counts["gpt-4"]    # o200k_base and cl100k_base really differ


async def test_long_texts_are_counted_exactly_too(serve: Serve) -> None:
    """Texts past a few KB are encoded off the event loop: the count is the same."""
    client = await serve({"tiers": {"t": {"max_output_tokens": 100}}})
    prompt = " ".join(f"token{i} 🚀 naïve café {i * 7919}" for i in range(2000))
    assert len(prompt) > 50_000
    resp, body = await call(client, "/v1/reserve",
                            {"user": "u1", "tier": "t", "model": "gpt-4o", "prompt": prompt})
    assert resp.status == 200, body
    assert body["input_tokens"] == len(o200k().encode(prompt))
    chat = [{"role": "user", "content": prompt}]
    resp, body = await call(client, "/v1/reserve",
                            {"user": "u1", "tier": "t", "model": "gpt-4o", "messages": chat})
    assert body["input_tokens"] == cookbook_count("gpt-4o", chat)
    resp, done = await call(client, "/v1/commit", {"reservation_id": body["reservation_id"],
                                                  "input_tokens": 1, "output_text": prompt,
                                                  "model": "gpt-4"})
    assert resp.status == 200, done
    assert done["usage"]["output_tokens"] == len(tiktoken.encoding_for_model("gpt-4")
                                                 .encode(prompt))


