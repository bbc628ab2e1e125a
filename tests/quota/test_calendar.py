"""Calendar periods, and one clock (Redis time) that may step back."""

from __future__ import annotations

from datetime import datetime

import pytest
from redis.asyncio import Redis

from ratelimitd.policy import (
    Limit,
    sliding,
)
from tests.support.clock import Clock
from tests.support.quota import (
    MINUTE,
    NY,
    SUB,
    calendar_budget,
    cost_nano,
    left,
    local_ms,
    make_engine,
    reason,
    rq,
    state_of,
    tier_plan,
)

# -- 4. calendar periods ----------------------------------------------------------------------

# (start, the next local midnight, extra instants before it that must still deny)
_DAYS = {
    # an ordinary day; 19:30 New York is already the next day in UTC
    "ordinary": (local_ms(NY, 2025, 11, 20, 18, 0), local_ms(NY, 2025, 11, 21),
                 [local_ms(NY, 2025, 11, 20, 19, 30)], 24),
    # fall back: 2 Nov 2025 lasts 25 h, so start + 24 h (23:00:30 local) is the same day
    "fall_back": (local_ms(NY, 2025, 11, 2, 0, 0, 30), local_ms(NY, 2025, 11, 3),
                  [local_ms(NY, 2025, 11, 2, 0, 0, 30) + 24 * 3_600_000], 25),
    # spring forward: 8 Mar 2026 lasts 23 h, the next day starts 23 h after midnight
    "spring_forward": (local_ms(NY, 2026, 3, 8, 0, 0, 30), local_ms(NY, 2026, 3, 9),
                       [local_ms(NY, 2026, 3, 8, 22, 0)], 23),
}


@pytest.mark.parametrize("day", list(_DAYS))
async def test_daily_budget_resets_at_local_midnight(
    redis_client: Redis, clock: Clock, day: str
) -> None:
    start, midnight, still_denied, hours = _DAYS[day]
    day_start = local_ms(NY, *datetime.fromtimestamp(start / 1000, NY).timetuple()[:3])
    assert midnight - day_start == hours * 3_600_000  # the test's own arithmetic
    clock.now = start
    engine = make_engine(redis_client, clock, timezone="America/New_York")
    budget = cost_nano(1000, 500)
    p = tier_plan(calendar_budget(budget))
    res = await engine.reserve(rq(p, 1000, 500))
    assert res.allowed and res.max_output_tokens == 500
    assert state_of(res, "daily_budget") == (0, midnight - start)
    res = await engine.reserve(rq(p, 1000, 500))
    assert not res.allowed and reason(res) == "daily_budget"
    assert res.retry_after_ms == midnight - start
    for t in [*still_denied, midnight - 1000, midnight - 1]:
        clock.now = t
        res = await engine.reserve(rq(p, 1000, 500))
        assert not res.allowed, f"admitted {(midnight - t) / 1000} s before local midnight"
    clock.now = midnight
    res = await engine.reserve(rq(p, 1000, 500))
    assert res.allowed
    assert state_of(res, "daily_budget") == (0, _next_midnight(midnight) - midnight)


def _next_midnight(t: int) -> int:
    d = datetime.fromtimestamp(t / 1000, NY)
    nxt = datetime.fromordinal(d.toordinal() + 1)
    return local_ms(NY, nxt.year, nxt.month, nxt.day)


async def test_commit_after_midnight_does_not_refund_into_the_new_day(
    redis_client: Redis, clock: Clock
) -> None:
    midnight = local_ms(NY, 2025, 11, 21)
    clock.now = midnight - 2_000
    engine = make_engine(redis_client, clock, timezone="America/New_York")
    budget = 10 * cost_nano(1000, 500)
    p = tier_plan(calendar_budget(budget))
    yesterday = await engine.reserve(rq(p, 1000, 500))
    assert yesterday.allowed
    clock.now = midnight + 1_000
    today = await engine.reserve(rq(p, 1000, 500))
    assert today.allowed
    assert (await left(engine, p))["user:daily_budget"] == budget - cost_nano(1000, 500)
    assert (await engine.commit(yesterday.reservation_id, 10, 0)).status == "applied"
    assert (await left(engine, p))["user:daily_budget"] == budget - cost_nano(1000, 500)
    assert (await engine.commit(today.reservation_id, 10, 0)).status == "applied"
    assert (await left(engine, p))["user:daily_budget"] == budget - cost_nano(10, 0)


async def test_monthly_budget_resets_at_the_local_start_of_the_month(
    redis_client: Redis, clock: Clock
) -> None:
    start = local_ms(NY, 2025, 11, 29, 22)
    month = local_ms(NY, 2025, 12, 1)
    clock.now = start
    engine = make_engine(redis_client, clock, timezone="America/New_York")
    budget = cost_nano(1000, 500)
    p = tier_plan(Limit("monthly_budget", "user", "cost_usd", budget, "calendar",
                        period="month"))
    res = await engine.reserve(rq(p, 1000, 500))
    assert res.allowed and state_of(res, "monthly_budget") == (0, month - start)
    for t in (local_ms(NY, 2025, 11, 30, 0, 0, 1), month - 1):   # a new day is not a new month
        clock.now = t
        assert not (await engine.reserve(rq(p, 1000, 500))).allowed
    clock.now = month
    assert (await engine.reserve(rq(p, 1000, 500))).allowed


# -- 11. one clock that may step back ----------------------------------------------------------


async def test_clock_stepping_back_never_over_admits(redis_client: Redis, clock: Clock) -> None:
    """Redis time can step back (a failover to a replica whose clock is a second behind). The
    window keeps the newer sub-bucket; whatever it does, a window never admits more than its
    limit."""
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000))
    t0 = clock.now
    admitted: list[tuple[int, int]] = []

    async def take(inp: int, out: int) -> bool:
        res = await engine.reserve(rq(p, inp, out))
        if res.allowed:
            admitted.append((clock.now, inp + res.max_output_tokens))
        return res.allowed

    assert await take(584, 16)              # 600 at t0
    clock.now = t0 + SUB
    assert await take(84, 16)               # 100 one sub-bucket later
    clock.now = t0 + 10                     # the clock steps back a sub-bucket
    assert await take(84, 16)               # 100 more
    for t in range(t0 + 2 * SUB, t0 + 3 * MINUTE, 5 * SUB):
        clock.now = t
        while await take(84, 16):
            pass
        for at, _ in admitted:
            window = sum(n for when, n in admitted if at - MINUTE < when <= at)
            assert window <= 1000, f"{window} tokens in the 60 s before {at - t0} ms"


async def test_each_tier_gets_its_own_limits_however_many_tiers_there_are(
    redis_client: Redis, clock: Clock
) -> None:
    # The Lua keeps parsed limit sets by their encoding, 256 at most, then starts over: 300
    # tiers, twice over, must each still be held to their own request limit.
    engine = make_engine(redis_client, clock)
    for round_ in range(2):
        for i in range(300):
            allowed = 1 + i % 3
            p = tier_plan(sliding("rpm", "requests", "60s", allowed),
                          sliding("tpm", "tokens", "60s", 10**6 + i), user=f"u{round_}-{i}")
            for _ in range(allowed):
                assert (await engine.reserve(rq(p, 10, 10))).allowed
            denied = await engine.reserve(rq(p, 10, 10))
            assert reason(denied) == "rpm"
