"""Concurrency slots, and settling: commit and release replace the estimate."""

from __future__ import annotations

from redis.asyncio import Redis

from ratelimitd.policy import (
    Prices,
    shorthand_limits,
    sliding,
)
from ratelimitd.quota.model import ReserveRequest
from tests.support.clock import Clock
from tests.support.quota import (
    MINUTE,
    SUB,
    bucket,
    calendar_budget,
    cost_nano,
    left,
    make_engine,
    reason,
    rq,
    state_of,
    tier_plan,
)

# -- 5. concurrency slots ---------------------------------------------------------------------


async def test_abandoned_reservation_frees_its_concurrency_slot_after_the_ttl(
    redis_client: Redis, clock: Clock
) -> None:
    """A crashed gateway never commits: its slot must come back once the reservation expires
    (at most one sub-bucket, TTL/60, late), and not before."""
    ttl = 60_000
    engine = make_engine(redis_client, clock, reservation_ttl_ms=ttl)
    p = tier_plan(*shorthand_limits(max_concurrent=1))
    first = await engine.reserve(rq(p))
    assert first.allowed and first.expires_at_ms == clock.now + ttl
    res = await engine.reserve(rq(p))
    assert not res.allowed and reason(res) == "max_concurrent"
    # the hint is the latest the slot surely frees: the ttl and one sub-bucket
    assert res.retry_after_ms == ttl + ttl // 60
    clock.advance(ttl - 1)
    assert not (await engine.reserve(rq(p))).allowed
    clock.advance(1 + ttl // 60)
    third = await engine.reserve(rq(p))
    assert third.allowed
    assert not (await engine.reserve(rq(p))).allowed
    # a commit frees the slot at once
    assert (await engine.commit(third.reservation_id, 100, 10)).status == "applied"
    fourth = await engine.reserve(rq(p))
    assert fourth.allowed
    assert (await engine.release(fourth.reservation_id)).status == "applied"
    assert (await engine.reserve(rq(p))).allowed


# -- 9. settling -----------------------------------------------------------------------------


async def test_overrun_is_charged_in_full_and_the_next_reserve_is_denied(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    roomy = tier_plan(sliding("tokens", "tokens", "60s", 2000), user="roomy")
    res = await engine.reserve(rq(roomy, 100, 100))
    done = await engine.commit(res.reservation_id, 100, 1000)
    assert done.status == "applied" and done.reserved_tokens == 200
    assert done.input_tokens + done.output_tokens - done.reserved_tokens == 900
    assert done.cost_nano == cost_nano(100, 1000) > done.reserved_cost_nano
    assert (await left(engine, roomy))["user:tokens"] == 2000 - 1100

    budget = 3 * cost_nano(100, 100)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000), calendar_budget(budget))
    res = await engine.reserve(rq(p, 100, 100))
    assert (await engine.commit(res.reservation_id, 100, 1000)).status == "applied"
    assert (await left(engine, p)) == {"user:tokens": 0, "user:daily_budget": 0}
    clock.advance(1_000)
    res = await engine.reserve(rq(p, 1, 1))
    assert not res.allowed and reason(res) in ("tokens", "daily_budget")
    # the overrun counts for the whole window: not admitted again until it slides out
    clock.advance(MINUTE - 2_000)
    free = Prices(0, 0, 0)
    res = await engine.reserve(ReserveRequest(p, 1, 1, free))
    assert not res.allowed and reason(res) == "tokens"
    # once it slid out, the tokens fit again, but the day's budget stays overrun
    clock.advance(2_000 + SUB)
    res = await engine.reserve(ReserveRequest(p, 1, 1, free))
    assert not res.allowed and reason(res) == "daily_budget"
    assert state_of(res, "tokens")[0] == 1000


async def test_commit_after_its_sub_bucket_slid_out_refunds_nothing(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000))
    old = await engine.reserve(rq(p, 100, 400))
    clock.advance(MINUTE + SUB)          # the old sub-bucket is out of the window
    new = await engine.reserve(rq(p, 100, 400))
    assert old.allowed and new.allowed
    assert (await left(engine, p))["user:tokens"] == 500
    assert (await engine.commit(old.reservation_id, 100, 0)).status == "applied"
    assert (await left(engine, p))["user:tokens"] == 500
    assert (await engine.release(new.reservation_id)).status == "applied"
    assert (await left(engine, p))["user:tokens"] == 1000


async def test_commit_inside_the_window_refunds_the_unused_estimate(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000), sliding("req", "requests", "60s", 5),
                  bucket(600, 1000, metric="tokens", name="bucket"))
    res = await engine.reserve(rq(p, 100, 400))
    clock.advance(30_000 + 7)             # another sub-bucket; still inside the window
    assert (await engine.commit(res.reservation_id, 80, 20)).status == "applied"
    got = await left(engine, p)
    assert got["user:tokens"] == 900 and got["user:req"] == 4
    # the bucket refilled 300 in 30 s, got 400 back, and holds at most its burst
    assert got["user:bucket"] == 1000


async def test_cost_is_integer_nano_usd_rounded_up(redis_client: Redis, clock: Clock) -> None:
    prices = Prices(input=1_234_567, output=10_000_000, cached_input=617_283)
    engine = make_engine(redis_client, clock)
    budget = 10**9
    p = tier_plan(calendar_budget(budget))
    res = await engine.reserve(ReserveRequest(p, 7, 50, prices))
    reserved = cost_nano(7, 50, prices)
    assert reserved == 508_642  # 8641.969 + 500000, rounded up
    assert res.reserved_cost_nano == reserved
    assert state_of(res, "daily_budget")[0] == budget - reserved
    done = await engine.commit(res.reservation_id, 7, 20, cached_input_tokens=3)
    actual = cost_nano(7, 20, prices, cached=3)
    assert actual == 206_791   # 4 x 1.234567 + 3 x 0.617283 + 20 x 10 micro, in nano, up
    assert (done.cost_nano, done.reserved_cost_nano) == (actual, reserved)
    assert (await left(engine, p))["user:daily_budget"] == budget - actual


