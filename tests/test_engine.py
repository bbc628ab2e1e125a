"""What a gateway relies on from the quota engine, against a real redis-server.

Every test drives ratelimitd.engine.Engine (and so the Lua scripts) through its public API and
checks the promises of the product contract (/work/shared/API.md, "Invariants"): no
over-admission, all or nothing, exactly once, integer money, bounded under-admission.
Time moves with the test clock (Engine.with_test_clock), except where Redis TIME is the point.
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from ratelimitd.engine import Engine, EngineSettings, Prices, ReserveRequest, ReserveResult
from ratelimitd.policy import Identity, Limit, Subject, Tier, plan, shorthand_limits, sliding
from tests.conftest import Clock
from tests.redis_servers import RedisServer

# $3 / $15 per 1M tokens (cached input $1.5): micro-USD per 1M tokens.
PRICES = Prices(input=3_000_000, output=15_000_000, cached_input=1_500_000)
MINUTE = 60_000
SUB = MINUTE // 60          # one sub-bucket of a 60 s sliding window
NY = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")

Plan = list[tuple[Subject, list[Limit]]]


def cost_nano(inp: int, out: int, prices: Prices = PRICES, cached: int = 0) -> int:
    """Nano-USD of a call: tokens x (micro-USD per 1M tokens) / 1000, rounded up."""
    num = (inp - cached) * prices.input + cached * prices.cached_input + out * prices.output
    return -(-num // 1000)


def tier_plan(*limits: Limit, user: str = "u1", org: str | None = None) -> Plan:
    return plan(Tier("t", tuple(limits)), Identity(user, "t", org=org))


def rq(p: Plan, inp: int = 100, out: int = 100, **kw: object) -> ReserveRequest:
    return ReserveRequest(p, inp, out, PRICES, **kw)  # type: ignore[arg-type]


def make_engine(client: Redis, clock: Clock, **settings: object) -> Engine:
    return Engine.with_test_clock(client, clock, EngineSettings(**settings))  # type: ignore[arg-type]


def calendar_budget(nano: int, name: str = "daily_budget", scope: str = "user") -> Limit:
    return Limit(name, scope, "cost_usd", nano, "calendar", period="day")


def concurrent(n: int, name: str = "max_concurrent") -> Limit:
    return Limit(name, "user", "concurrent", n, "sliding")


def bucket(rate: int, burst: int, metric: str = "requests", name: str = "bucket") -> Limit:
    return Limit(name, "user", metric, rate, "token_bucket",  # type: ignore[arg-type]
                 window_ms=MINUTE, burst=burst)


def local_ms(tz: ZoneInfo, y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()) * 1000


async def snapshot(client: Redis) -> dict[bytes, tuple[object, object]]:
    """Every key with its type and serialized value: equal snapshots mean nothing changed."""
    keys = sorted([k async for k in client.scan_iter(count=1000)])
    return {k: (await client.type(k), await client.dump(k)) for k in keys}


async def left(engine: Engine, p: Plan) -> dict[str, int]:
    """What each limit has left, by `scope:name`, read with dry runs (they reserve nothing).

    Each subject is asked on its own, so a denying subject cannot hide another's state. A dry
    run answers as if it had reserved one request and one slot (0 tokens, 0 cost); that is
    added back when it was allowed.
    """
    out: dict[str, int] = {}
    for subject, limits in p:
        if not limits:
            continue
        res = await engine.reserve(ReserveRequest([(subject, limits)], 0, 0, PRICES,
                                                  min_output_tokens=0, dry_run=True))
        for state in res.states:
            charged = res.allowed and state.limit.metric in ("requests", "concurrent")
            out[f"{subject.scope}:{state.limit.name}"] = state.remaining + int(charged)
    return out


def state_of(res: ReserveResult, name: str) -> tuple[int, int]:
    [state] = [s for s in res.states if s.limit.name == name]
    return state.remaining, state.reset_ms


def reason(res: ReserveResult) -> str | None:
    return None if res.denied_by is None else res.denied_by.limit.name


# -- 1. many callers at once -----------------------------------------------------------------


async def _burst_clients(server: RedisServer, n: int) -> list[Redis]:
    return [Redis.from_pool(BlockingConnectionPool.from_url(
        server.url, max_connections=4, client_name=f"burst-{i}")) for i in range(n)]


async def _jittered(engine: Engine, req: ReserveRequest, ticks: int) -> ReserveResult:
    """Starts a reserve a few event-loop ticks late, so calls of the daemons interleave."""
    for _ in range(ticks):
        await asyncio.sleep(0)
    return await engine.reserve(req)


async def test_500_concurrent_reserves_admit_exactly_the_request_limit(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """Four daemons (own connection pools), Redis TIME: 100 of 500 simultaneous calls pass."""
    clients = await _burst_clients(redis_server, 4)
    try:
        engines = [Engine(c) for c in clients]
        p = tier_plan(sliding("requests_per_minute", "requests", "60s", 100))
        results = await asyncio.gather(
            *(_jittered(engines[i % 4], rq(p, 10, 10), i % 7) for i in range(500)))
        names = [c["name"] for c in await redis_client.client_list()
                 if c["name"].startswith("burst-")]
        requests_left = (await left(engines[0], p))["user:requests_per_minute"]
    finally:
        for c in clients:
            await c.aclose()
    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 100
    assert len({r.reservation_id for r in admitted}) == 100
    denied = [r for r in results if not r.allowed]
    assert {reason(r) for r in denied} == {"requests_per_minute"}
    assert all(r.retry_after_ms is not None and r.retry_after_ms > 0 for r in denied)
    # over the real connections of all four daemons
    assert set(names) == {f"burst-{i}" for i in range(4)}
    assert requests_left == 0


async def test_concurrent_reserves_of_random_sizes_never_exceed_a_token_limit(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """Grant what fits under contention: the admitted sum stays within the limit, and every
    denied call really did not fit in what was left at the end."""
    limit = 20_000
    rnd = random.Random(20251124)
    calls = [(rnd.randint(10, 300), rnd.randint(16, 600)) for _ in range(500)]
    clients = await _burst_clients(redis_server, 4)
    try:
        engines = [Engine(c) for c in clients]
        p = tier_plan(sliding("tokens_per_minute", "tokens", "60s", limit))
        results = await asyncio.gather(
            *(_jittered(engines[i % 4], rq(p, inp, out), i % 5)
              for i, (inp, out) in enumerate(calls)))
        remaining = (await left(engines[0], p))["user:tokens_per_minute"]
    finally:
        for c in clients:
            await c.aclose()
    charged = 0
    for (inp, out), r in zip(calls, results, strict=True):
        if r.allowed:
            assert 16 <= r.max_output_tokens <= out
            charged += inp + r.max_output_tokens
    assert charged <= limit
    assert remaining == limit - charged
    denied = [(inp, r) for (inp, _), r in zip(calls, results, strict=True) if not r.allowed]
    assert denied, "the limit was meant to run out"
    for inp, r in denied:
        assert reason(r) == "tokens_per_minute"
        # what was left only shrank, so a denied call must not fit even at the end
        assert inp + 16 > remaining


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
    engine = make_engine(redis_client, clock, reservation_ttl_ms=150)
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000))
    res = await engine.reserve(rq(p, 100, 100))
    assert res.expires_at_ms == clock.now + 150
    await asyncio.sleep(0.3)
    clock.advance(300)
    assert (await engine.commit(res.reservation_id, 10, 10)).status == "not_found"
    assert (await engine.release(res.reservation_id)).status == "not_found"
    assert (await left(engine, p))["user:tokens"] == 800


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
    assert res.retry_after_ms is not None and 0 < res.retry_after_ms <= 1000
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
