"""Blocks (abuse/blocks.py) are enforced inside the reserve's own calls: a blocked subject,
with limits of its own or as a guard (an ip, a key), refuses the reserve and charges nothing."""

from __future__ import annotations

from redis.asyncio import Redis

from ratelimitd.abuse.blocks import BlockStore
from ratelimitd.policy import Subject, sliding
from ratelimitd.quota.model import ReserveRequest
from tests.support.clock import Clock
from tests.support.quota import PRICES, left, make_engine, tier_plan


async def test_a_blocked_later_subject_refuses_and_the_earlier_ones_are_refunded(
        redis_client: Redis, clock: Clock) -> None:
    engine = make_engine(redis_client, clock)
    rpm = sliding("rpm", "requests", "60s", 10)
    org_rpm = sliding("org_rpm", "requests", "60s", 100, scope="org")
    p = tier_plan(rpm, org_rpm, org="acme")
    await BlockStore(redis_client, clock=clock).add(Subject("org", "acme"), 600, "unpaid invoice")
    res = await engine.reserve(ReserveRequest(p, 10, 10, PRICES))
    assert not res.allowed and res.blocked is not None
    assert (res.blocked.subject, res.blocked.reason) == (Subject("org", "acme"), "unpaid invoice")
    assert res.retry_after_ms == 600_000
    assert (await left(engine, p))["user:rpm"] == 10              # the user was refunded


async def test_a_blocked_guard_refuses_a_reserve_its_subjects_would_grant(
        redis_client: Redis, clock: Clock) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("rpm", "requests", "60s", 10))
    ip = Subject("ip", "198.51.100.7")
    await BlockStore(redis_client, clock=clock).add(ip, 900, "credential stuffing")
    res = await engine.reserve(ReserveRequest(p, 10, 10, PRICES, guards=[ip]))
    assert not res.allowed and res.blocked is not None and res.blocked.subject == ip
    assert res.blocked.reason == "credential stuffing"
    # the user's reservation, granted in the same tick, was cancelled: only a barred record
    # of that attempt remains, and the user's limits are whole
    assert (await left(engine, p))["user:rpm"] == 10
    other_ip = Subject("ip", "203.0.113.9")
    assert (await engine.reserve(ReserveRequest(p, 10, 10, PRICES, guards=[other_ip]))).allowed
