"""The HTTP API of API.md over real sockets against a real Redis.

Each test serves `create_app(config, redis_url)` on a localhost TCP port (pytest-aiohttp) and
talks to it with a real HTTP client; Redis is the session's redis-server, flushed per test.
Nothing of Redis or of ratelimitd is mocked.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tiktoken
from redis.asyncio import Redis

from ratelimitd.scripts import Library
from tests.http_helpers import (
    SMALL_TIER,
    UNKNOWN_RID,
    Serve,
    assert_error,
    call,
    cost_nano,
    go_duration_ms,
    limit_of,
    nano,
    parse_sf_list,
    seconds_up,
    serve_fixture,  # noqa: F401  (the `serve` fixture)
    snapshot,
)
from tests.redis_servers import RedisServer, free_port, redis_binary

GPT4O = {"input": 2.5, "output": 10.0, "cached_input": 1.25}
RESERVE_KEYS = {"allowed", "reservation_id", "expires_at_ms", "input_tokens",
                "max_output_tokens", "reserved", "limits", "warnings", "duplicate"}


def small(**tier: Any) -> dict[str, Any]:
    """A config with one tier "t" (SMALL_TIER overridden by `tier`) and gpt-4o's prices."""
    return {"tiers": {"t": {**SMALL_TIER, **tier}}, "pricing": {"gpt-4o": GPT4O}}


def rq(**fields: Any) -> dict[str, Any]:
    """A reserve body for user u1 on tier t, model gpt-4o."""
    return {"user": "u1", "tier": "t", "model": "gpt-4o", **fields}


def o200k() -> Any:
    return tiktoken.encoding_for_model("gpt-4o")


def cookbook_count(model: str, messages: list[dict[str, str]]) -> int:
    """OpenAI cookbook's num_tokens_from_messages, with tiktoken's own encoding for the model."""
    encoding = tiktoken.encoding_for_model(model)
    tokens = 3
    for message in messages:
        tokens += 3
        for key, value in message.items():
            tokens += len(encoding.encode(value))
            if key == "name":
                tokens += 1
    return tokens


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


async def test_a_call_that_can_never_fit_says_so_and_sends_no_retry_after(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(small(tokens_per_day=1000))
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=5000))
    assert resp.status == 429, body
    assert body["reason"] == "tokens_per_day"
    assert body["retry_after_ms"] is None
    assert "retrying will not help" in body["message"]
    assert "Retry-After" not in resp.headers
    assert await redis_client.keys("*") == []


async def test_concurrency_slots_deny_then_free_on_commit_and_release(serve: Serve) -> None:
    client = await serve(small(max_concurrent=2))
    ids = []
    for _ in range(2):
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, body
        ids.append(body["reservation_id"])
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 429 and body["reason"] == "max_concurrent", body
    assert 0 < body["retry_after_ms"] <= 1000
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


# -- reserve / commit / release ----------------------------------------------------------------

async def test_reserve_commit_charges_the_actual_cost(serve: Serve, redis_client: Redis) -> None:
    client = await serve(small(daily_budget_usd=1.0, tokens_per_day=100_000,
                               max_output_tokens=1000))
    resp, first = await call(client, "/v1/reserve", rq(input_tokens=1200, max_output_tokens=800))
    assert resp.status == 200, first
    estimate = cost_nano(1200, 800, pi=2.5, po=10.0)
    assert nano(first["reserved"]["cost_usd"]) == estimate == 11_000_000
    assert nano(limit_of(first, "daily_budget_usd")["remaining"]) == 1_000_000_000 - estimate

    commit = {"reservation_id": first["reservation_id"], "input_tokens": 1200,
              "cached_input_tokens": 1000, "output_tokens": 333}
    resp, done = await call(client, "/v1/commit", commit)
    assert resp.status == 200, done
    actual = cost_nano(1200, 333, 1000, pi=2.5, po=10.0, pc=1.25)
    assert actual == (200 * 2.5 + 1000 * 1.25 + 333 * 10.0) * 1000 == 5_080_000
    assert done == {"committed": True, "duplicate": False, "cost_usd": actual / 1e9,
                    "usage": {"input_tokens": 1200, "cached_input_tokens": 1000,
                              "output_tokens": 333},
                    "alerts": []}

    # what a reserve dry-runs is what it then reserves; both count the actual cost, not the
    # estimate, of the committed call
    resp, dry = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100,
                                                     dry_run=True))
    assert resp.status == 200, dry
    resp, second = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    assert resp.status == 200, second
    second_est = cost_nano(100, 100, pi=2.5, po=10.0)
    assert nano(second["reserved"]["cost_usd"]) == second_est
    budget = limit_of(second, "daily_budget_usd")["remaining"]
    assert nano(budget) == 1_000_000_000 - actual - second_est
    assert limit_of(second, "tokens_per_day")["remaining"] == 100_000 - (1200 + 333) - 200
    assert limit_of(second, "requests_per_minute")["remaining"] == 5 - 2
    assert limit_of(second, "max_concurrent")["remaining"] == 3 - 1   # the first slot is free
    assert [(d["name"], d["remaining"]) for d in dry["limits"]] == \
        [(s["name"], s["remaining"]) for s in second["limits"]]

    # a repeated commit answers the same, flagged, and charges nothing more
    before = await snapshot(redis_client)
    for repeat in (commit, {**commit, "cached_input_tokens": 0, "output_tokens": 900}):
        resp, again = await call(client, "/v1/commit", repeat)
        assert resp.status == 200, again
        assert again == {**done, "duplicate": True}
    assert await snapshot(redis_client) == before


async def test_commit_over_the_reservation_reports_the_overrun_and_charges_it(
        serve: Serve) -> None:
    client = await serve(small(tokens_per_day=1000, daily_budget_usd=1.0, max_output_tokens=100))
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=100))
    assert resp.status == 200 and rsv["max_output_tokens"] == 100, rsv
    resp, done = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 100, "output_tokens": 1000})
    assert resp.status == 200, done
    actual = cost_nano(100, 1000, pi=2.5, po=10.0)
    reserved = cost_nano(100, 100, pi=2.5, po=10.0)
    assert nano(done["cost_usd"]) == actual
    assert done["overrun"]["tokens"] == 1100 - 200
    assert nano(done["overrun"]["cost_usd"]) == actual - reserved
    # charged in full: 1100 of 1000 tokens are spent, so the next reserve is denied
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1))
    assert resp.status == 429, body
    assert body["reason"] == "tokens_per_day"
    assert limit_of(body, "tokens_per_day")["remaining"] == 0
    assert nano(limit_of(body, "daily_budget_usd")["remaining"]) == 1_000_000_000 - actual


async def test_commit_within_the_reservation_has_no_overrun(serve: Serve) -> None:
    client = await serve(small())
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    resp, done = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 100, "output_tokens": 100})
    assert resp.status == 200, done
    assert "overrun" not in done
    assert nano(done["cost_usd"]) == nano(rsv["reserved"]["cost_usd"])


async def test_release_refunds_everything(serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    body = rq(input_tokens=500, max_output_tokens=200)
    resp, first = await call(client, "/v1/reserve", body)
    assert resp.status == 200, first
    resp, released = await call(client, "/v1/release",
                                {"reservation_id": first["reservation_id"]})
    assert resp.status == 200, released
    assert released == {"released": True, "duplicate": False}
    before = await snapshot(redis_client)
    resp, again = await call(client, "/v1/release", {"reservation_id": first["reservation_id"]})
    assert resp.status == 200 and again == {"released": True, "duplicate": True}
    assert await snapshot(redis_client) == before
    # the same call again finds every limit as the first one did: the first left no trace
    resp, second = await call(client, "/v1/reserve", body)
    assert resp.status == 200, second
    assert [(s["name"], s["remaining"]) for s in second["limits"]] == \
        [(f["name"], f["remaining"]) for f in first["limits"]]


async def test_commit_counts_output_text_with_tiktoken(serve: Serve) -> None:
    client = await serve(small())
    text = "Bonjour ! Voici la réponse : 42. ✅ Les fourmis ont six pattes."
    for model, extra in (("gpt-4o", {"model": "gpt-4o"}), ("gpt-4", {"model": "gpt-4"}),
                         ("gpt-4o", {})):                    # no model: the default o200k_base
        resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, rsv
        resp, done = await call(client, "/v1/commit",
                                {"reservation_id": rsv["reservation_id"], "input_tokens": 10,
                                 "output_text": text, **extra})
        assert resp.status == 200, done
        n_out = len(tiktoken.encoding_for_model(model).encode(text))
        assert done["usage"]["output_tokens"] == n_out, model
        assert nano(done["cost_usd"]) == cost_nano(10, n_out, pi=2.5, po=10.0)


async def test_commit_after_release_and_release_after_commit_are_409(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    _, a = await call(client, "/v1/reserve", rq(input_tokens=10))
    _, b = await call(client, "/v1/reserve", rq(input_tokens=10))
    await call(client, "/v1/release", {"reservation_id": a["reservation_id"]})
    await call(client, "/v1/commit", {"reservation_id": b["reservation_id"],
                                      "input_tokens": 10, "output_tokens": 1})
    before = await snapshot(redis_client)
    resp, body = await call(client, "/v1/commit", {"reservation_id": a["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 1})
    assert_error(resp, body, 409, "reservation_released", "reservation_id")
    resp, body = await call(client, "/v1/release", {"reservation_id": b["reservation_id"]})
    assert_error(resp, body, 409, "reservation_committed", "reservation_id")
    assert await snapshot(redis_client) == before


@pytest.mark.parametrize("rid", [
    UNKNOWN_RID,                                   # well-formed, never issued (user:u1)
    "rsv_" + "B" * 24 + ".dXNlcjpub2JvZHk",        # well-formed, another user's slot
    "rsv_AAAA.dXNlcjp1MQ",                         # random part too short
    "hello",
    "rsv_",
    "rsv_???.!!!",
    "rsv_abc." + "x" * 900,
])
async def test_commit_and_release_of_unknown_ids_are_404(serve: Serve, redis_client: Redis,
                                                         rid: str) -> None:
    client = await serve(small())
    await call(client, "/v1/reserve", rq(input_tokens=10))
    before = await snapshot(redis_client)
    resp, body = await call(client, "/v1/commit", {"reservation_id": rid, "input_tokens": 1,
                                                  "output_tokens": 1})
    assert_error(resp, body, 404, "reservation_not_found", "reservation_id")
    resp, body = await call(client, "/v1/release", {"reservation_id": rid})
    assert_error(resp, body, 404, "reservation_not_found", "reservation_id")
    assert await snapshot(redis_client) == before


async def test_a_limit_of_another_scope_denies_all_or_nothing(serve: Serve) -> None:
    """An ip limit lives in another Redis slot than the user's: when it denies, what the
    user's slot had reserved is given back, and a release frees both."""
    client = await serve({"tiers": {"t": {
        "requests_per_minute": 100,
        "limits": [{"name": "per_ip", "scope": "ip", "metric": "requests", "window": "1m",
                    "limit": 2}]}}})

    def from_ip(user: str, ip: str) -> dict[str, Any]:
        return {"user": user, "tier": "t", "model": "gpt-4o", "input_tokens": 10,
                "max_output_tokens": 10, "attributes": {"ip": ip}}

    resp, a = await call(client, "/v1/reserve", from_ip("a", "2001:db8::7"))
    assert resp.status == 200, a
    assert limit_of(a, "per_ip")["scope"] == "ip"
    # the same address spelled otherwise is the same subject
    resp, b = await call(client, "/v1/reserve", from_ip("b", "2001:0DB8:0:0::7"))
    assert resp.status == 200, b
    assert limit_of(b, "per_ip")["remaining"] == 0
    resp, c = await call(client, "/v1/reserve", from_ip("c", "2001:db8::7"))
    assert resp.status == 429 and c["reason"] == "per_ip", c
    # c's own limits kept nothing of the denied call
    resp, c2 = await call(client, "/v1/reserve", from_ip("c", "192.0.2.1"))
    assert resp.status == 200, c2
    assert limit_of(c2, "requests_per_minute")["remaining"] == 99
    # releasing a's call frees its place on the ip limit too
    resp, _ = await call(client, "/v1/release", {"reservation_id": a["reservation_id"]})
    assert resp.status == 200
    resp, c3 = await call(client, "/v1/reserve", from_ip("c", "2001:db8::7"))
    assert resp.status == 200, c3
    assert limit_of(c3, "requests_per_minute")["remaining"] == 98


@pytest.mark.parametrize("user", ["{u1}", "a}b{c%7D", "名前 with spaces", "x" * 256,
                                  "user:u1", "dXNlcjp1MQ=="])
async def test_any_user_id_gets_its_own_limits_and_a_working_reservation(
        serve: Serve, user: str) -> None:
    client = await serve(small())
    resp, mine = await call(client, "/v1/reserve", {**rq(input_tokens=10), "user": user})
    assert resp.status == 200, mine
    resp, other = await call(client, "/v1/reserve", rq(input_tokens=10))       # user u1
    assert limit_of(other, "requests_per_minute")["remaining"] == 4              # not shared
    resp, done = await call(client, "/v1/commit", {"reservation_id": mine["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 3})
    assert resp.status == 200 and done["duplicate"] is False, done
    resp, again = await call(client, "/v1/reserve", {**rq(input_tokens=10), "user": user})
    assert limit_of(again, "tokens_per_day")["remaining"] == 2000 - 13 - 310


async def test_an_expired_reservation_is_404_and_its_estimate_stays_charged(
        serve: Serve) -> None:
    client = await serve({**small(), "reservations": {"ttl_s": 1}})
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    assert resp.status == 200, rsv
    assert 0 < rsv["expires_at_ms"] - time.time() * 1000 <= 1000
    await asyncio.sleep(1.1)
    resp, body = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 100, "output_tokens": 10})
    assert_error(resp, body, 404, "reservation_not_found", "expired")
    resp, body = await call(client, "/v1/release", {"reservation_id": rsv["reservation_id"]})
    assert_error(resp, body, 404, "reservation_not_found")
    resp, again = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    assert limit_of(again, "tokens_per_day")["remaining"] == 2000 - 2 * 200
    assert limit_of(again, "requests_per_minute")["remaining"] == 3


# -- idempotency and dry runs ------------------------------------------------------------------

async def test_idempotency_key_returns_the_first_reservation_and_charges_once(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    body = rq(input_tokens=100, idempotency_key="req-7f3a")
    resp, first = await call(client, "/v1/reserve", body)
    assert resp.status == 200 and first["duplicate"] is False, first
    before = await snapshot(redis_client)
    resp, again = await call(client, "/v1/reserve", body)
    assert resp.status == 200, again
    assert again["duplicate"] is True
    assert again["reservation_id"] == first["reservation_id"]
    for key in ("expires_at_ms", "input_tokens", "max_output_tokens", "reserved"):
        assert again[key] == first[key], key
    assert limit_of(again, "requests_per_minute")["remaining"] == 4
    assert await snapshot(redis_client) == before
    # another key is another call
    resp, other = await call(client, "/v1/reserve", {**body, "idempotency_key": "req-8b1c"})
    assert other["reservation_id"] != first["reservation_id"] and other["duplicate"] is False
    assert limit_of(other, "requests_per_minute")["remaining"] == 3
    # the retried reservation commits once
    commit = {"reservation_id": again["reservation_id"], "input_tokens": 100,
              "output_tokens": 10}
    _, done = await call(client, "/v1/commit", commit)
    assert done["duplicate"] is False


async def test_dry_run_answers_and_reserves_nothing(serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    await call(client, "/v1/reserve", rq(input_tokens=100))
    before = await snapshot(redis_client)
    for _ in range(3):
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=100, dry_run=True))
        assert resp.status == 200, body
        assert body["allowed"] is True and body["dry_run"] is True
        assert body["reservation_id"] is None
        assert body["max_output_tokens"] == 300
        assert limit_of(body, "requests_per_minute")["remaining"] == 3   # as if reserving
    assert await snapshot(redis_client) == before


# -- invalid requests --------------------------------------------------------------------------

VALIDATION = small(max_prompt_chars=1000, max_input_tokens=40)
VALIDATION["pricing"]["unknown_model"] = "deny"

BAD_RESERVES: list[tuple[Any, str, str]] = [
    ({**rq(input_tokens=1), "temperature": 0.2}, "invalid_request", "temperature"),
    ({**rq(input_tokens=1), "user": 42}, "invalid_request", "user"),
    ({**rq(input_tokens=1), "user": ""}, "invalid_request", "user"),
    ({**rq(input_tokens=1), "user": "a\nb"}, "invalid_request", "user"),
    ({"tier": "t", "model": "gpt-4o", "input_tokens": 1}, "invalid_request", "user"),
    ({"user": "u1", "tier": "t", "input_tokens": 1}, "invalid_request", "model"),
    (rq(input_tokens="10"), "invalid_request", "input_tokens"),
    (rq(input_tokens=-1), "invalid_request", "input_tokens"),
    (rq(input_tokens=True), "invalid_request", "input_tokens"),
    (rq(input_tokens=1.5), "invalid_request", "input_tokens"),
    (rq(input_tokens=1, max_output_tokens="lots"), "invalid_request", "max_output_tokens"),
    (rq(input_tokens=1, dry_run="yes"), "invalid_request", "dry_run"),
    (rq(input_tokens=1, attributes={"ip": "999.1.1.1"}), "invalid_request", "attributes.ip"),
    (rq(input_tokens=1, attributes={"ip": "not an ip"}), "invalid_request", "attributes.ip"),
    (rq(input_tokens=1, attributes=["ip"]), "invalid_request", "attributes"),
    (rq(input_tokens=1, attributes={"Device-ID": "x"}), "invalid_request", "attributes.Device-ID"),
    (rq(input_tokens=1, attributes={"device": 7}), "invalid_request", "device"),
    (rq(input_tokens=1, prompt="hi"), "invalid_request", "exactly one of prompt"),
    (rq(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "invalid_request",
     "exactly one of prompt"),
    (rq(), "invalid_request", "exactly one of prompt"),
    (rq(prompt=["hi"]), "invalid_request", "prompt"),
    (rq(messages="hi"), "invalid_request", "messages"),
    (rq(messages=["hi"]), "invalid_request", "messages"),
    (rq(messages=[{"content": "hi"}]), "invalid_request", "messages[0].role"),
    (rq(messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {}}]}]),
     "invalid_request", "messages[0].content[1]"),
    ({**rq(input_tokens=1), "api_key": "sk-live-123"}, "invalid_request", "api_key"),
    ({**rq(input_tokens=1), "signature": {"value": "ab"}}, "invalid_request", "signature"),
    (rq(input_tokens=1, tier="gold"), "invalid_request", "tier"),
    ([rq(input_tokens=1)], "invalid_request", "body"),
    ("just a string", "invalid_request", "body"),
    (rq(prompt=""), "empty_prompt", "prompt"),
    (rq(prompt="  \n\t "), "empty_prompt", "prompt"),
    (rq(messages=[{"role": "user", "content": ""}]), "empty_prompt", "messages"),
    (rq(messages=[]), "empty_prompt", "messages"),
    (rq(prompt="x" * 1001), "prompt_too_long", "1000"),
    (rq(messages=[{"role": "user", "content": "y" * 600}, {"role": "user", "content": "z" * 401}]),
     "prompt_too_long", "messages"),
    (rq(input_tokens=41), "too_many_input_tokens", "40"),
    (rq(prompt="word " * 60), "too_many_input_tokens", "input_tokens"),
    (rq(input_tokens=1, model="mystery-model-9"), "unknown_model", "mystery-model-9"),
]


@pytest.mark.parametrize(("body", "code", "mention"), BAD_RESERVES,
                         ids=[f"{c}-{m}"[:60] for _, c, m in BAD_RESERVES])
async def test_bad_reserve_is_400_and_changes_nothing(serve: Serve, redis_client: Redis,
                                                      body: Any, code: str, mention: str) -> None:
    client = await serve(VALIDATION)
    resp, ok = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 200, ok
    before = await snapshot(redis_client)
    resp, answer = await call(client, "/v1/reserve", body)
    assert_error(resp, answer, 400, code, mention)
    assert await snapshot(redis_client) == before


async def test_limits_at_the_boundary_are_accepted(serve: Serve) -> None:
    client = await serve(VALIDATION)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=40))
    assert resp.status == 200, body
    chars = await serve(small(max_prompt_chars=1000))
    resp, body = await call(chars, "/v1/reserve", rq(prompt="x" * 1000))
    assert resp.status == 200, body
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, model="gpt-4o-2024-08-06",
                                                      attributes={"ip": "2001:db8::1"}))
    assert resp.status == 200, body                              # a dated snapshot is priced


async def test_malformed_json_is_400(serve: Serve, redis_client: Redis) -> None:
    client = await serve(VALIDATION)
    for path in ("/v1/reserve", "/v1/commit", "/v1/release"):
        resp = await client.post(path, data=b'{"user": "u1", ',
                                 headers={"Content-Type": "application/json"})
        assert_error(resp, await resp.json(), 400, "invalid_request", "JSON")
    assert await redis_client.keys("*") == []


BAD_SETTLES: list[tuple[str, Any, str]] = [
    ("/v1/commit", {"input_tokens": 1, "output_tokens": 1}, "reservation_id"),
    ("/v1/commit", {"reservation_id": 5, "input_tokens": 1, "output_tokens": 1},
     "reservation_id"),
    ("/v1/commit", {"reservation_id": "R", "output_tokens": 1}, "input_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1}, "output_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1, "output_tokens": 1,
                    "output_text": "x"}, "output_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1, "output_text": 5}, "output_text"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 10, "output_tokens": -1},
     "output_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 10, "cached_input_tokens": 11,
                    "output_tokens": 1}, "cached_input_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1, "output_tokens": 1, "cost": 1},
     "cost"),
    ("/v1/release", {}, "reservation_id"),
    ("/v1/release", {"reservation_id": "R", "reason": "timeout"}, "reason"),
    ("/v1/release", ["R"], "body"),
]


@pytest.mark.parametrize(("path", "body", "mention"), BAD_SETTLES)
async def test_bad_commit_or_release_is_400_and_changes_nothing(
        serve: Serve, redis_client: Redis, path: str, body: Any, mention: str) -> None:
    client = await serve(small())
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 200
    if isinstance(body, dict) and body.get("reservation_id") == "R":
        body = {**body, "reservation_id": rsv["reservation_id"]}
    before = await snapshot(redis_client)
    resp, answer = await call(client, path, body)
    assert_error(resp, answer, 400, "invalid_request", mention)
    assert await snapshot(redis_client) == before
    # the reservation is still open: it commits normally afterwards
    resp, done = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 1})
    assert resp.status == 200 and done["duplicate"] is False


# -- routing errors ----------------------------------------------------------------------------

async def test_unknown_path_is_404_json(serve: Serve) -> None:
    client = await serve()
    for method, path in (("GET", "/"), ("POST", "/v1/reserv"), ("GET", "/v2/reserve")):
        resp, body = await call(client, path, method=method)
        assert_error(resp, body, 404, "not_found")


async def test_wrong_method_is_405_json_with_allow(serve: Serve) -> None:
    client = await serve()
    for method, path, allowed in (("GET", "/v1/reserve", "POST"), ("PUT", "/v1/commit", "POST"),
                                  ("DELETE", "/v1/release", "POST"), ("POST", "/healthz", "GET"),
                                  ("POST", "/readyz", "GET"), ("POST", "/openapi.json", "GET")):
        resp, body = await call(client, path, method=method)
        assert_error(resp, body, 405, "method_not_allowed")
        assert resp.headers.get("Allow") == allowed, (method, path)


# -- service tokens ----------------------------------------------------------------------------

@pytest.fixture
def service_token_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RATELIMITD_TEST_GATEWAY_TOKEN", "gw-from-env-5f2c")
    return "gw-from-env-5f2c"


async def test_service_tokens_guard_v1(serve: Serve, redis_client: Redis,
                                       service_token_env: str) -> None:
    client = await serve({**small(), "server": {
        "service_tokens": ["gw-literal-91ab", "env:RATELIMITD_TEST_GATEWAY_TOKEN"]}})
    body = rq(input_tokens=10)
    for headers, code in (({}, "missing_credentials"),
                          ({"Authorization": "Basic Z3c6cGFzcw=="}, "missing_credentials"),
                          ({"Authorization": "Bearer"}, "missing_credentials"),
                          ({"Authorization": "Bearer "}, "missing_credentials"),
                          ({"Authorization": "Bearer gw-literal-91ac"}, "invalid_service_token"),
                          ({"Authorization": "Bearer env:RATELIMITD_TEST_GATEWAY_TOKEN"},
                           "invalid_service_token"),
                          ({"Authorization": "Bearer gw-literal-91ab-and-more"},
                           "invalid_service_token")):
        for path in ("/v1/reserve", "/v1/commit", "/v1/release"):
            resp, answer = await call(client, path, body, headers=headers)
            assert_error(resp, answer, 401, code)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis_client.keys("*") == []            # no unauthenticated call wrote
    for token in ("gw-literal-91ab", service_token_env):
        resp, answer = await call(client, "/v1/reserve", body,
                                  headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200, answer
        resp, answer = await call(client, "/v1/release",
                                  {"reservation_id": answer["reservation_id"]},
                                  headers={"Authorization": f"bearer {token}"})
        assert resp.status == 200, answer
    # health and description need no token
    for path in ("/healthz", "/readyz", "/openapi.json"):
        resp = await client.get(path)
        assert resp.status == 200, path


async def test_without_service_tokens_v1_is_open(serve: Serve) -> None:
    client = await serve(small())
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1),
                            headers={"Authorization": "Bearer anything"})
    assert resp.status == 200, body


# -- body size ---------------------------------------------------------------------------------

async def test_body_over_max_body_bytes_is_413(serve: Serve, redis_client: Redis) -> None:
    client = await serve({**small(), "server": {"max_body_bytes": 2048}})

    def chunked(prompt_chars: int) -> AsyncIterator[bytes]:
        """A body with no Content-Length (Transfer-Encoding: chunked), in 100-byte chunks."""
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"user": "u1", "tier": "t", "model": "gpt-4o", "prompt": "'
            for start in range(0, prompt_chars, 100):
                yield b"y" * min(100, prompt_chars - start)
            yield b'"}'
        return chunks()

    for path in ("/v1/reserve", "/v1/commit", "/v1/release"):
        resp, body = await call(client, path, rq(prompt="x" * 3000))   # Content-Length ~3100
        assert_error(resp, body, 413, "body_too_large", "2048")
        resp = await client.post(path, data=chunked(3000),
                                 headers={"Content-Type": "application/json"})
        assert_error(resp, await resp.json(), 413, "body_too_large", "2048")
    assert await redis_client.keys("*") == []
    # just under the limit is fine, sized up front or chunked
    resp, body = await call(client, "/v1/reserve", rq(prompt="x" * 1900))
    assert resp.status == 200, body
    resp = await client.post("/v1/reserve", data=chunked(1900),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"


# -- health, readiness and an unavailable Redis ------------------------------------------------

async def test_healthz_and_readyz(serve: Serve, redis_client: Redis) -> None:
    client = await serve()
    resp, body = await call(client, "/healthz", method="GET")
    assert resp.status == 200 and body == {"status": "ok"}
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 200
    assert body == {"ready": True, "redis": "ok", "scripts": "loaded", "config": "<test>"}
    # a Redis that lost its functions (restart, FUNCTION FLUSH) gets them back from /readyz
    await redis_client.function_flush()
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 200 and body["ready"] is True
    assert await redis_client.function_list(library=Library.from_lua().name)


async def test_redis_going_down_gives_503_and_readyz_says_so(serve: Serve, tmp_path: Any) -> None:
    own = RedisServer(tmp_path / "redis")
    try:
        client = await serve({**small(), "redis": {"timeout_ms": 200}}, url=own.url)
        resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, rsv
        resp, body = await call(client, "/readyz", method="GET")
        assert resp.status == 200 and body["ready"] is True
    finally:
        own.stop()
    started = time.monotonic()
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert_error(resp, body, 503, "backend_unavailable")
    assert resp.headers["Retry-After"] == "1"
    resp, body = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 1})
    assert_error(resp, body, 503, "backend_unavailable")
    resp, body = await call(client, "/v1/release", {"reservation_id": rsv["reservation_id"]})
    assert_error(resp, body, 503, "backend_unavailable")
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 503
    assert body["ready"] is False and "unavailable" in body["redis"]
    resp, body = await call(client, "/healthz", method="GET")       # the process is still up
    assert resp.status == 200 and body == {"status": "ok"}
    assert time.monotonic() - started < 5                            # failures come fast


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)


async def test_the_daemon_recovers_when_redis_comes_back_empty(serve: Serve,
                                                               tmp_path: Path) -> None:
    """A Redis restarted without its data or scripts: no daemon restart needed."""
    port = free_port()
    proc = start_redis(port, tmp_path / "a")
    try:
        client = await serve({**small(), "redis": {"timeout_ms": 200}},
                             url=f"redis://127.0.0.1:{port}/0")
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, body
    finally:
        proc.terminate()
        proc.wait(10)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert_error(resp, body, 503, "backend_unavailable")
    proc = start_redis(port, tmp_path / "b")
    try:
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))   # no library: reload
        assert resp.status == 200, body
        assert limit_of(body, "requests_per_minute")["remaining"] == 4        # an empty Redis
        resp, body = await call(client, "/readyz", method="GET")
        assert resp.status == 200 and body["ready"] is True
    finally:
        proc.terminate()
        proc.wait(10)


async def test_no_redis_answers_503_by_default(serve: Serve) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await serve({**small(), "redis": {"timeout_ms": 50}}, url=dead)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert_error(resp, body, 503, "backend_unavailable", "Redis")
    assert resp.headers["Retry-After"] == "1"
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 503 and body["ready"] is False


async def test_no_redis_with_on_error_allow_admits_degraded(serve: Serve) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await serve({**small(), "redis": {"timeout_ms": 50, "on_error": "allow"}},
                         url=dead)
    resp, body = await call(client, "/v1/reserve", rq(prompt="hello there",
                                                      max_output_tokens=50))
    assert resp.status == 200, body
    assert body["allowed"] is True and body["degraded"] is True
    assert body["reservation_id"] is None
    assert body["input_tokens"] == len(o200k().encode("hello there"))
    assert body["max_output_tokens"] == 50
    assert body["reserved"] == {"requests": 0, "tokens": 0, "cost_usd": 0.0}
    assert [w["code"] for w in body["warnings"]] == ["backend_unavailable"]
    # input is still checked first: a bad request is refused even when degraded
    resp, answer = await call(client, "/v1/reserve", rq(input_tokens=-5))
    assert_error(resp, answer, 400, "invalid_request", "input_tokens")
    # commit and release have no degraded form
    resp, answer = await call(client, "/v1/commit", {"reservation_id": UNKNOWN_RID,
                                                    "input_tokens": 1, "output_tokens": 1})
    assert_error(resp, answer, 503, "backend_unavailable")
