"""Grant what fits: the largest output cap every limit allows."""

from __future__ import annotations

from redis.asyncio import Redis

from ratelimitd.policy import (
    sliding,
)
from ratelimitd.quota.model import ReserveRequest
from tests.support.clock import Clock
from tests.support.quota import (
    PRICES,
    Plan,
    calendar_budget,
    cost_nano,
    left,
    make_engine,
    reason,
    rq,
    state_of,
    tier_plan,
)

# -- 8. grant what fits -----------------------------------------------------------------------


async def test_grant_what_fits_in_the_tokens_left(redis_client: Redis, clock: Clock) -> None:
    engine = make_engine(redis_client, clock)
    tokens = sliding("tokens_per_minute", "tokens", "60s", 1000)

    async def user_with_left(user: str, tokens_left: int) -> Plan:
        p = tier_plan(tokens, user=user)
        res = await engine.reserve(rq(p, 1000 - tokens_left - 100, 100))
        assert res.allowed and (await left(engine, p))["user:tokens_per_minute"] == tokens_left
        return p

    p = await user_with_left("a", 600)
    res = await engine.reserve(rq(p, 100, 1000))
    assert res.allowed and res.max_output_tokens == 500
    assert state_of(res, "tokens_per_minute")[0] == 0
    res = await engine.reserve(rq(p, 1, 16))
    assert not res.allowed and reason(res) == "tokens_per_minute"

    p = await user_with_left("b", 116)           # exactly input + the minimum 16
    res = await engine.reserve(rq(p, 100, 1000))
    assert res.allowed and res.max_output_tokens == 16

    p = await user_with_left("c", 115)           # not even the minimum output fits
    res = await engine.reserve(rq(p, 100, 1000))
    assert not res.allowed and reason(res) == "tokens_per_minute"
    assert res.max_output_tokens == 0 and res.reservation_id == ""
    assert state_of(res, "tokens_per_minute")[0] == 115
    assert (await left(engine, p))["user:tokens_per_minute"] == 115
    # a smaller minimum, or a requested cap below it, fits
    res = await engine.reserve(ReserveRequest(p, 100, 1000, PRICES, min_output_tokens=10))
    assert res.allowed and res.max_output_tokens == 15

    p = await user_with_left("d", 105)
    res = await engine.reserve(rq(p, 100, 5))
    assert res.allowed and res.max_output_tokens == 5

    p = await user_with_left("e", 800)           # room to spare: the requested cap
    res = await engine.reserve(rq(p, 100, 300))
    assert res.allowed and res.max_output_tokens == 300


async def test_grant_what_fits_in_the_cost_budget(redis_client: Redis, clock: Clock) -> None:
    engine = make_engine(redis_client, clock)
    budget = 1_234_567
    p = tier_plan(calendar_budget(budget))
    res = await engine.reserve(rq(p, 100, 1000))
    expected = (budget * 1000 - 100 * PRICES.input) // PRICES.output
    assert expected == 62
    assert res.allowed and res.max_output_tokens == expected
    assert state_of(res, "daily_budget")[0] == budget - cost_nano(100, 62)
    res = await engine.reserve(rq(p, 1, 16))
    assert not res.allowed and reason(res) == "daily_budget"


async def test_request_larger_than_a_limit_is_denied_with_no_retry(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens_per_minute", "tokens", "60s", 1000))
    res = await engine.reserve(rq(p, 990, 100))
    assert not res.allowed and reason(res) == "tokens_per_minute"
    assert res.retry_after_ms is None
    assert (await left(engine, p))["user:tokens_per_minute"] == 1000


