"""Time: token buckets, retry-after, remaining and reset."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from ratelimitd.policy import (
    sliding,
)
from tests.support.clock import Clock
from tests.support.quota import (
    MINUTE,
    SUB,
    UTC,
    bucket,
    calendar_budget,
    concurrent,
    cost_nano,
    left,
    local_ms,
    make_engine,
    reason,
    rq,
    state_of,
    tier_plan,
)

# -- 10. time: token buckets, retry-after, remaining and reset --------------------------------


async def test_token_bucket_refills_over_time_up_to_its_burst(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(bucket(6, 3))            # 6 a minute: one every 10 s, at most 3 at once
    for _ in range(3):
        assert (await engine.reserve(rq(p))).allowed
    res = await engine.reserve(rq(p))
    assert not res.allowed and reason(res) == "bucket"
    assert res.retry_after_ms is not None and 10_000 <= res.retry_after_ms <= 10_000 + 1
    clock.advance(9_999)
    assert not (await engine.reserve(rq(p))).allowed
    clock.advance(1)
    assert (await engine.reserve(rq(p))).allowed
    assert not (await engine.reserve(rq(p))).allowed
    clock.advance(25_000)                  # 2.5 tokens: 2 whole ones
    assert (await engine.reserve(rq(p))).allowed
    assert (await engine.reserve(rq(p))).allowed
    assert not (await engine.reserve(rq(p))).allowed
    clock.advance(5_000)                   # the half token carried over completes
    assert (await engine.reserve(rq(p))).allowed
    clock.advance(3_600_000)               # a long pause refills only up to the burst
    assert [(await engine.reserve(rq(p))).allowed for _ in range(4)] == [True] * 3 + [False]


# case: (limit, calls as (ms since the previous one, input, output), ms to the denied call,
#        ms from the denied call until the call fits exactly, how late retry_after may be)
_RETRY_CASES = {
    # the first call leaves (t - 60 s, t] 60 s after it was made
    "requests": (sliding("lim", "requests", "60s", 3),
                 [(0, 10, 10), (10_000, 10, 10), (10_000, 10, 10)], 10_000, 30_000, SUB),
    "tokens": (sliding("lim", "tokens", "60s", 1000),
               [(0, 400, 400), (5_000, 100, 84)], 10_000, 45_000, SUB),
    # one a second, burst 2, full at the first call: the next unit is due 1 s after it
    "bucket": (bucket(60, 2, name="lim"), [(0, 10, 10), (400, 10, 10)], 100, 500, 1_000),
    # 2025-11-24 16:00:00.5 UTC + 10 s: the next UTC day
    "calendar": (calendar_budget(cost_nano(500, 500), name="lim"), [(0, 500, 500)], 10_000,
                 local_ms(UTC, 2025, 11, 25) - local_ms(UTC, 2025, 11, 24, 16, 0, 10) - 500, 0),
}


@pytest.mark.parametrize("case", list(_RETRY_CASES))
async def test_retry_after_is_positive_and_waiting_it_out_admits(
    redis_client: Redis, clock: Clock, case: str
) -> None:
    limit, calls, gap, exact, slack = _RETRY_CASES[case]
    clock.advance(500)                     # mid sub-bucket
    assert clock.now == local_ms(UTC, 2025, 11, 24, 16) + 500
    engine = make_engine(redis_client, clock)
    p = tier_plan(limit)
    for step, inp, out in calls:
        clock.advance(step)
        assert (await engine.reserve(rq(p, inp, out))).allowed
    clock.advance(gap)
    res = await engine.reserve(rq(p, 100, 500))
    assert not res.allowed and reason(res) == "lim"
    retry = res.retry_after_ms
    assert retry is not None and retry > 0
    # never too early; late by at most one sub-bucket (sliding) or refill unit (bucket)
    assert exact <= retry <= exact + slack
    clock.advance(retry)
    assert (await engine.reserve(rq(p, 100, 500))).allowed


async def test_reply_reports_remaining_and_reset_of_every_limit(
    redis_client: Redis, clock: Clock
) -> None:
    t0 = local_ms(UTC, 2025, 11, 24, 12) + 250
    clock.now = t0
    engine = make_engine(redis_client, clock)
    budget = 10 * cost_nano(200, 300)
    p = tier_plan(sliding("rpm", "requests", "60s", 10), sliding("tpm", "tokens", "60s", 5000),
                  calendar_budget(budget), bucket(4, 4, name="bucket"), concurrent(3))
    res = await engine.reserve(rq(p, 200, 300))
    assert [s.limit.name for s in res.states] == [
        "rpm", "tpm", "daily_budget", "bucket", "max_concurrent"]
    rpm, tpm = state_of(res, "rpm"), state_of(res, "tpm")
    assert rpm[0] == 9 and tpm[0] == 4500
    assert MINUTE <= rpm[1] <= MINUTE + SUB and MINUTE <= tpm[1] <= MINUTE + SUB
    assert state_of(res, "daily_budget") == (budget - cost_nano(200, 300),
                                             local_ms(UTC, 2025, 11, 25) - t0)
    assert state_of(res, "bucket") == (3, 15_000)   # one back every 15 s
    assert state_of(res, "max_concurrent")[0] == 2
    # twenty seconds later: the newest call sets the reset of the sliding windows
    clock.advance(20_000)
    res = await engine.reserve(rq(p, 200, 300))
    rpm = state_of(res, "rpm")
    assert rpm[0] == 8 and MINUTE <= rpm[1] <= MINUTE + SUB
    assert state_of(res, "tpm")[0] == 4000
    assert state_of(res, "bucket")[0] == 3          # refilled one, spent one
    assert state_of(res, "max_concurrent")[0] == 1
    # "ms until back to full" holds: after it, everything is full again
    clock.advance(max(rpm[1], state_of(res, "tpm")[1], state_of(res, "bucket")[1]))
    got = await left(engine, p)
    assert got["user:rpm"] == 10 and got["user:tpm"] == 5000 and got["user:bucket"] == 4


async def test_windows_admit_again_once_usage_slides_out(
    redis_client: Redis, clock: Clock
) -> None:
    """Bounded under-admission: a call counts for its window, plus at most one sub-bucket."""
    engine = make_engine(redis_client, clock)
    p = tier_plan(sliding("rpm", "requests", "60s", 2))
    clock.advance(999)                      # the end of a sub-bucket: the worst case
    assert (await engine.reserve(rq(p))).allowed
    assert (await engine.reserve(rq(p))).allowed
    clock.advance(MINUTE - 1)
    assert not (await engine.reserve(rq(p))).allowed   # still inside (t - 60 s, t]
    clock.advance(SUB + 1)
    assert (await engine.reserve(rq(p))).allowed




async def test_a_bucket_refilled_by_a_refund_refills_nothing_twice_after_a_step_back(
    redis_client: Redis, clock: Clock
) -> None:
    """A refund fills the bucket, then Redis time steps back 127 ms (a failover, NTP): the
    bucket counts on from the newest time it was full at, so once time is back it refills only
    what the time since then earns, not the 127 ms a second time."""
    engine = make_engine(redis_client, clock)
    p = tier_plan(bucket(600, 100, metric="tokens"))      # 10 tokens a second, at most 100
    first = await engine.reserve(rq(p, 30, 20))
    assert first.allowed
    clock.advance(1_050)                    # 10.5 tokens refilled: the level is 60 and a half
    assert (await engine.commit(first.reservation_id, 0, 0)).status == "applied"
    full_at = clock.now                     # the refund of 50 fills the bucket
    clock.advance(-127)
    assert (await engine.reserve(rq(p, 80, 20))).allowed      # the whole burst
    clock.now = full_at + 990               # 9.9 tokens since it was last full
    res = await engine.reserve(rq(p, 10, 0, min_output_tokens=0))
    assert not res.allowed and reason(res) == "bucket"
    assert res.retry_after_ms == 10
    clock.now = full_at + 1_000
    assert (await engine.reserve(rq(p, 10, 0, min_output_tokens=0))).allowed
