"""Exactly once: settles and idempotent retries never charge or refund twice; dry runs."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from ratelimitd.policy import (
    Limit,
    sliding,
)
from tests.support.clock import Clock
from tests.support.quota import (
    bucket,
    calendar_budget,
    concurrent,
    left,
    make_engine,
    rq,
    snapshot,
    state_of,
    tier_plan,
)

# -- 3. exactly once --------------------------------------------------------------------------


def _settle_tier() -> tuple[Limit, ...]:
    return (
        sliding("requests", "requests", "60s", 10),
        sliding("tokens", "tokens", "60s", 10_000),
        calendar_budget(10**10, name="cost"),
        bucket(60, 5000, metric="tokens", name="bucket"),
        concurrent(3, name="concurrency"),
        sliding("global_tokens", "tokens", "60s", 100_000, scope="global"),
    )


async def test_repeated_commit_is_a_duplicate_and_changes_nothing(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(*_settle_tier())
    res = await engine.reserve(rq(p, 300, 500))
    assert res.allowed
    first = await engine.commit(res.reservation_id, 250, 100, cached_input_tokens=50)
    assert first.status == "applied"
    assert (first.input_tokens, first.cached_input_tokens, first.output_tokens) == (250, 50, 100)
    after_commit = await left(engine, p)
    assert after_commit["user:tokens"] == 10_000 - 350
    assert after_commit["global:global_tokens"] == 100_000 - 350
    assert after_commit["user:concurrency"] == 3
    clock.advance(2_000)
    after_commit = await left(engine, p)
    before = await snapshot(redis_client)
    again = await engine.commit(res.reservation_id, 250, 100, cached_input_tokens=50)
    assert again.status == "duplicate"
    assert again.cost_nano == first.cost_nano
    # a repeat with other numbers is still the same commit: never charged twice
    other = await engine.commit(res.reservation_id, 300, 5000)
    assert other.status == "duplicate"
    assert (other.input_tokens, other.output_tokens) == (250, 100)
    conflict = await engine.release(res.reservation_id)
    assert conflict.status == "conflict"
    assert await snapshot(redis_client) == before
    assert await left(engine, p) == after_commit


async def test_repeated_release_is_a_duplicate_and_commit_after_release_conflicts(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(*_settle_tier())
    fresh = await left(engine, p)
    res = await engine.reserve(rq(p, 300, 500))
    assert res.allowed
    assert (await engine.release(res.reservation_id)).status == "applied"
    assert await left(engine, p) == fresh  # everything refunded, slot freed
    before = await snapshot(redis_client)
    assert (await engine.release(res.reservation_id)).status == "duplicate"
    assert (await engine.commit(res.reservation_id, 300, 500)).status == "conflict"
    assert (await engine.release(res.reservation_id)).status == "duplicate"
    assert await snapshot(redis_client) == before
    assert await left(engine, p) == fresh


async def test_unknown_reservation_is_not_found(redis_client: Redis, clock: Clock) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000))
    res = await engine.reserve(rq(p))
    bogus = res.reservation_id.replace("rsv_", "rsv_x", 1)
    for rid in ("", "nonsense", bogus, "rsv_abc.dXNlcjp1Mg"):
        assert (await engine.commit(rid, 1, 1)).status == "not_found"
        assert (await engine.release(rid)).status == "not_found"
    assert (await left(engine, p))["user:tokens"] == 800


async def test_expired_reservation_is_not_found_and_its_estimate_stays_charged(
    redis_client: Redis, clock: Clock
) -> None:
    """Reservation records live in real Redis time: this one takes a short real sleep."""
    engine = make_engine(redis_client, clock, reservation_ttl_ms=150, commit_grace_ms=100)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000))
    res = await engine.reserve(rq(p, 100, 100))
    assert res.expires_at_ms == clock.now + 150
    await asyncio.sleep(0.4)                   # past the ttl and the commit grace
    clock.advance(400)
    assert (await engine.commit(res.reservation_id, 10, 10)).status == "not_found"
    assert (await engine.release(res.reservation_id)).status == "not_found"
    assert (await left(engine, p))["user:tokens"] == 800


async def test_a_late_commit_within_the_grace_charges_the_actual_usage(
    redis_client: Redis, clock: Clock
) -> None:
    """A gateway that commits after the reservation expired still pays for its overrun."""
    engine = make_engine(redis_client, clock, reservation_ttl_ms=150, commit_grace_ms=30_000)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000))
    res = await engine.reserve(rq(p, 100, 10))
    await asyncio.sleep(0.3)                   # past the ttl, within the grace
    clock.advance(300)
    done = await engine.commit(res.reservation_id, 100, 410)
    assert done.status == "applied" and done.reserved_tokens == 110
    assert (await left(engine, p))["user:tokens"] == 1000 - 510
    again = await engine.commit(res.reservation_id, 100, 410)
    assert again.status == "duplicate"
    assert (await left(engine, p))["user:tokens"] == 1000 - 510


# -- 6. idempotency, dry run ------------------------------------------------------------------


async def test_idempotency_key_charges_once(redis_client: Redis, clock: Clock) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000), concurrent(5))
    a = await engine.reserve(rq(p, 100, 100, idempotency_key="k1"))
    clock.advance(1_500)
    b = await engine.reserve(rq(p, 100, 100, idempotency_key="k1"))
    assert a.allowed and b.allowed and b.duplicate and not a.duplicate
    assert b.reservation_id == a.reservation_id
    assert (b.max_output_tokens, b.expires_at_ms) == (a.max_output_tokens, a.expires_at_ms)
    assert await left(engine, p) == {"user:tokens": 800, "user:max_concurrent": 4}
    c = await engine.reserve(rq(p, 100, 100, idempotency_key="k2"))
    assert c.allowed and c.reservation_id != a.reservation_id and not c.duplicate
    assert await left(engine, p) == {"user:tokens": 600, "user:max_concurrent": 3}
    # the same key of another user is another call
    other = tier_plan(sliding("tokens", "tokens", "60s", 1000), concurrent(5), user="u2")
    d = await engine.reserve(rq(other, 100, 100, idempotency_key="k1"))
    assert d.allowed and d.reservation_id != a.reservation_id
    # after the commit, a late retry still answers the first reservation, charging nothing
    assert (await engine.commit(a.reservation_id, 100, 50)).status == "applied"
    e = await engine.reserve(rq(p, 100, 100, idempotency_key="k1"))
    assert e.reservation_id == a.reservation_id
    assert await left(engine, p) == {"user:tokens": 650, "user:max_concurrent": 4}


@pytest.mark.parametrize("committed", [False, True])
async def test_retry_asking_a_smaller_cap_answers_the_first_reservation_unchanged(
    redis_client: Redis, clock: Clock, committed: bool
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens", "tokens", "60s", 10_000), user="u1", org="o1")
    p += tier_plan(sliding("org_tokens", "tokens", "60s", 10_000, scope="org"), user="u1",
                   org="o1")[1:]
    first = await engine.reserve(rq(p, 100, 800, idempotency_key="k"))
    assert first.allowed and first.max_output_tokens == 800
    if committed:
        assert (await engine.commit(first.reservation_id, 100, 100)).status == "applied"
    used = await left(engine, p)
    again = await engine.reserve(rq(p, 100, 200, idempotency_key="k"))
    assert again.duplicate and again.reservation_id == first.reservation_id
    assert again.max_output_tokens == 800
    assert await left(engine, p) == used


async def test_dry_run_answers_as_if_reserving_and_reserves_nothing(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000), concurrent(2),
                  calendar_budget(10**10))
    assert (await engine.reserve(rq(p, 100, 100))).allowed
    before = await snapshot(redis_client)
    dry = await engine.reserve(rq(p, 200, 2000, dry_run=True, idempotency_key="d"))
    assert dry.allowed and dry.reservation_id == ""
    assert dry.max_output_tokens == 600  # 1000 - 200 used - 200 input
    assert state_of(dry, "tokens")[0] == 0
    assert state_of(dry, "max_concurrent")[0] == 0
    assert await snapshot(redis_client) == before
    assert (await engine.reserve(rq(p, 200, 600))).allowed
    dry = await engine.reserve(rq(p, 10, 10, dry_run=True))
    assert not dry.allowed
    assert (await engine.reserve(rq(p, 10, 10))).allowed is False


