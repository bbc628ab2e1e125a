"""All or nothing: a denied reserve consumes nothing, on one subject or several."""

from __future__ import annotations

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
    cost_nano,
    left,
    make_engine,
    reason,
    rq,
    snapshot,
    tier_plan,
)

# -- 2. a denied reserve consumes nothing ------------------------------------------------------


def _denial_tier(case: str) -> tuple[Limit, ...]:
    """Five limits of every kind; the one named by `case` is exhausted by two calls of
    (200 in, 50 out), the others are ample."""
    two = 2 if case in ("requests", "bucket", "concurrency") else 100
    return (
        sliding("requests", "requests", "60s", 2 if case == "requests" else 100),
        sliding("tokens", "tokens", "60s", 500 if case == "tokens" else 100_000),
        calendar_budget(2 * cost_nano(200, 50) if case == "cost" else 10**12, name="cost"),
        bucket(6, 2 if case == "bucket" else 100, name="bucket"),
        concurrent(two, name="concurrency"),
    )


@pytest.mark.parametrize("case", ["requests", "tokens", "cost", "bucket", "concurrency"])
async def test_denied_reserve_changes_no_key(
    redis_client: Redis, clock: Clock, case: str
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(*_denial_tier(case))
    for _ in range(2):
        assert (await engine.reserve(rq(p, 200, 50))).allowed
    clock.advance(1_500)  # windows would have to move on: a denial must not store even that
    before = await snapshot(redis_client)
    res = await engine.reserve(rq(p, 200, 50))
    assert not res.allowed and reason(res) == case
    res = await engine.reserve(rq(p, 200, 50, idempotency_key="retry-me"))
    assert not res.allowed and reason(res) == case
    res = await engine.reserve(rq(p, 200, 50, dry_run=True))
    assert not res.allowed
    assert await snapshot(redis_client) == before


# -- 7. all or nothing over several subjects --------------------------------------------------


def _multi_tier(org_rpm: int, global_rpm: int) -> tuple[Limit, ...]:
    return (
        sliding("user_rpm", "requests", "60s", 10),
        sliding("user_tokens", "tokens", "60s", 10_000),
        calendar_budget(10**10, name="user_budget"),
        concurrent(5, name="user_concurrent"),
        sliding("org_rpm", "requests", "60s", org_rpm, scope="org"),
        sliding("org_tokens", "tokens", "60s", 100_000, scope="org"),
        sliding("global_rpm", "requests", "60s", global_rpm, scope="global"),
    )


@pytest.mark.parametrize(("org_rpm", "global_rpm", "denier", "scope"),
                         [(100, 2, "global_rpm", "global"), (2, 100, "org_rpm", "org")])
async def test_a_later_subject_denying_leaves_earlier_subjects_unchanged(
    redis_client: Redis, clock: Clock, org_rpm: int, global_rpm: int, denier: str, scope: str
) -> None:
    engine = make_engine(redis_client, clock)
    limits = _multi_tier(org_rpm, global_rpm)
    p1 = tier_plan(*limits, user="u1", org="o1")
    p2 = tier_plan(*limits, user="u2", org="o1")
    assert [s.scope for s, _ in p1] == ["user", "org", "global"]
    assert (await engine.reserve(rq(p1, 300, 200))).allowed
    assert (await engine.reserve(rq(p2, 300, 200))).allowed
    before = await left(engine, p1)
    assert before["user:user_tokens"] == 10_000 - 500
    assert before["user:user_concurrent"] == 4
    res = await engine.reserve(rq(p1, 300, 200))
    assert not res.allowed and reason(res) == denier
    assert res.denied_by is not None and res.denied_by.subject.scope == scope
    assert await left(engine, p1) == before
    # and nothing is left half-reserved that a later, allowed call could trip over
    clock.advance(61_000)
    res = await engine.reserve(rq(p1, 300, 200))
    assert res.allowed
    after = await left(engine, p1)
    assert after["user:user_concurrent"] == 3
    assert after["user:user_budget"] == 10**10 - 2 * cost_nano(300, 200)


async def test_idempotent_retry_charges_every_subject_once(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("user_tokens", "tokens", "60s", 10_000),
                  sliding("org_tokens", "tokens", "60s", 10_000, scope="org"),
                  sliding("global_rpm", "requests", "60s", 10, scope="global"), org="o1")
    first = await engine.reserve(rq(p, 100, 100, idempotency_key="same"))
    again = await engine.reserve(rq(p, 100, 100, idempotency_key="same"))
    assert first.allowed and again.duplicate and again.reservation_id == first.reservation_id
    expected = {"user:user_tokens": 9_800, "org:org_tokens": 9_800, "global:global_rpm": 9}
    assert await left(engine, p) == expected
    assert (await engine.commit(first.reservation_id, 100, 20)).status == "applied"
    assert await left(engine, p) == {**expected, "user:user_tokens": 9_880,
                                     "org:org_tokens": 9_880}


async def test_reply_remaining_reflects_the_final_grant_on_every_subject(
    redis_client: Redis, clock: Clock
) -> None:
    """Each later subject grants less output (user 1000, org 900, global 200): the earlier ones
    are shrunk to the final grant, and what the reply says is left must be what is left."""
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("user_tokens", "tokens", "60s", 10_000),
                  calendar_budget(10**10, name="user_budget"),
                  sliding("org_tokens", "tokens", "60s", 1_000, scope="org"),
                  sliding("global_tokens", "tokens", "60s", 300, scope="global"), org="o1")
    res = await engine.reserve(rq(p, 100, 1000))
    assert res.allowed and res.max_output_tokens == 200
    assert res.reserved_cost_nano == cost_nano(100, 200)
    expected = {"user:user_tokens": 9_700, "user:user_budget": 10**10 - cost_nano(100, 200),
                "org:org_tokens": 700, "global:global_tokens": 0}
    assert await left(engine, p) == expected
    assert {f"{s.subject.scope}:{s.limit.name}": s.remaining for s in res.states} == expected


