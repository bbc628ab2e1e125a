"""Quota under races and odd configurations, one test (or two) each.

Each test drives the engine (or the config reader) through a race or an odd configuration,
against a real redis-server, and asserts what a user relies on.
Races are ordered step by step with tests/support/faults.py's FaultyTransport, which holds or
fails chosen calls of a real transport.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ratelimitd.config import ConfigError, parse_config
from ratelimitd.errors import ReserveInProgress, StoreUnavailable
from ratelimitd.policy import Identity, Limit, Tier, plan, sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.ids import SEAL_REDIS_KEY
from ratelimitd.store.transport import BatchTransport
from tests.support.clock import Clock
from tests.support.fault_load import drained
from tests.support.faults import FaultyTransport, on
from tests.support.quota import (
    UTC,
    bucket,
    concurrent,
    cost_nano,
    left,
    local_ms,
    make_engine,
    reason,
    rq,
    tier_plan,
)
from tests.support.redis_servers import RedisServer


def _tier_limits(window: str, limit: int = 1) -> Limit:
    config = parse_config({"tiers": {"t": {"limits": [
        {"name": "w", "scope": "user", "metric": "requests", "window": window,
         "limit": limit}]}}})
    [lim] = config.tiers["t"].limits
    return lim


async def _pttls(client: Redis) -> dict[bytes, int]:
    """Every key's remaining life in ms (but the id secret's, made once to last)."""
    return {k: await client.pttl(k) async for k in client.scan_iter()
            if k != SEAL_REDIS_KEY.encode()}


# -- 2. every time that reaches Redis is a whole number of ms ---------------------------------

async def test_a_ttl_not_divisible_by_3_gives_concurrency_keys_a_whole_ms_expiry(
    redis_client: Redis, clock: Clock
) -> None:
    """ttl 100 s: the concurrency window's sub-buckets are 1666.67 ms wide."""
    engine = make_engine(redis_client, clock, reservation_ttl_ms=100_000)
    p = tier_plan(concurrent(2), _tier_limits("90ms", 5))
    first = await engine.reserve(rq(p))
    assert first.allowed
    assert (await engine.reserve(rq(p))).allowed
    res = await engine.reserve(rq(p))
    assert not res.allowed and reason(res) == "max_concurrent"    # both slots really taken
    assert (await engine.release(first.reservation_id)).status == "applied"
    assert (await engine.reserve(rq(p))).allowed
    ttls = await _pttls(redis_client)
    assert b"rl:{user:u1}" in ttls
    assert all(t > 0 for t in ttls.values()), ttls       # no key lives forever


def test_a_window_longer_than_the_engine_keeps_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"tiers\.t\.limits\[0\]\.window.*366d"):
        _tier_limits("100000000000d")


# -- 3. an idempotent retry racing a denial ---------------------------------------------------

async def test_a_retry_racing_a_first_reserve_denied_later_is_never_a_half_charged_grant(
    redis_client: Redis, clock: Clock
) -> None:
    """A reserves the user, B (same key) finds A's record there, A is denied at global and
    undoes the user, global frees up, B goes on: B must not answer a grant the user never
    paid for (an allowed duplicate whose commit answers 409)."""
    ta, tb = (FaultyTransport(BatchTransport(redis_client, None)) for _ in range(2))
    a, b = (Engine.with_test_clock(t, clock) for t in (ta, tb))
    limits = (sliding("user_rq", "requests", "60s", 10),
              sliding("global_rq", "requests", "60s", 1, scope="global"))
    p = tier_plan(*limits)
    other = await a.reserve(rq(tier_plan(*limits, user="u9")))     # global's one request
    gate_a, gate_b = ta.hold(on("global:*")), tb.hold(on("global:*"))
    first = asyncio.create_task(a.reserve(rq(p, idempotency_key="same")))
    await gate_a.arrived.wait()                         # A holds the user
    retry = asyncio.create_task(b.reserve(rq(p, idempotency_key="same")))
    await gate_b.arrived.wait()                         # B saw A's record on the user
    gate_a.go.set()
    denied = await first
    assert not denied.allowed and reason(denied) == "global_rq"
    assert (await a.release(other.reservation_id)).status == "applied"
    gate_b.go.set()
    try:
        res = await retry
    except ReserveInProgress:
        res = None
    if res is not None and res.allowed:                 # a grant must be a whole one
        assert (await b.commit(res.reservation_id, 100, 10)).status == "applied"
    # whatever B answered, evaluated afresh now the retry is allowed and charges once
    again = await b.reserve(rq(p, idempotency_key="same"))
    assert again.allowed
    assert await left(a, p) == {"user:user_rq": 9, "global:global_rq": 0}


async def test_a_retry_answering_with_a_failed_first_reserve_keeps_its_charges(
    redis_client: Redis, clock: Clock
) -> None:
    """A's last call runs but its reply is lost (a timeout): A answers 503 and its cancels
    wait for Redis. B (same key) finds A's records on every subject and answers with them.
    A's cancels landing after that must not release the reservation B granted (b4a375e: B's
    grant was left charged nowhere, and its commit answered 409)."""
    faulty = FaultyTransport(BatchTransport(redis_client, None))
    a = Engine.with_test_clock(faulty, clock)
    b = make_engine(redis_client, clock)
    p = tier_plan(sliding("user_rq", "requests", "60s", 10),
                  sliding("org_rq", "requests", "60s", 10, scope="org"),
                  sliding("global_rq", "requests", "60s", 10, scope="global"), org="o1")
    faulty.fail(on("global:*", "reserve"), "after")
    cancels = faulty.fail(lambda function, _: function.endswith("settle"), "before", 10**6)
    with pytest.raises(StoreUnavailable):
        await a.reserve(rq(p, idempotency_key="same"))
    assert len(a.compensator.pending) == 3
    res = await b.reserve(rq(p, idempotency_key="same"))
    assert res.allowed and res.duplicate
    cancels.times = 0                                   # Redis takes A's cancels now
    await drained([a], 5.0)
    expected = {"user:user_rq": 9, "org:org_rq": 9, "global:global_rq": 9}
    assert await left(b, p) == expected
    assert (await b.commit(res.reservation_id, 100, 10)).status == "applied"
    await a.aclose()


# -- 4. calendar periods and a clock that steps back ------------------------------------------

async def test_a_clock_stepping_back_over_midnight_does_not_renew_the_day(
    redis_client: Redis, clock: Clock
) -> None:
    """A budget of 5 calls a day; Redis time steps back over midnight (a failover to a
    skewed replica) and forward again: at most 5 calls are charged to the new day."""
    engine = make_engine(redis_client, clock)
    one = cost_nano(100, 100)
    p = tier_plan(Limit("daily", "user", "cost_usd", 5 * one, "calendar", period="day"))
    admitted = 0
    for at in (local_ms(UTC, 2026, 3, 2, 0, 0, 10),      # the new day: 5 fit
               local_ms(UTC, 2026, 3, 1, 23, 59, 50),    # stepped back into yesterday
               local_ms(UTC, 2026, 3, 2, 0, 1, 0)):      # and forward again
        clock.now = at
        for _ in range(6):
            admitted += (await engine.reserve(rq(p, 100, 100))).allowed
    assert admitted == 5


async def test_a_clock_stepping_back_does_not_refill_a_token_bucket_twice(
    redis_client: Redis, clock: Clock
) -> None:
    """A commit while Redis time is a minute behind must not move the bucket's refill clock
    back: once time is back, that minute would refill a second time."""
    engine = make_engine(redis_client, clock)
    p = tier_plan(bucket(60, 100, metric="tokens"))          # 1 token a second, 100 at most
    res = await engine.reserve(rq(p, 50, 50))                 # the bucket is empty
    assert res.allowed and res.max_output_tokens == 50
    clock.advance(-60_000)                                    # a minute back
    assert (await engine.commit(res.reservation_id, 50, 30)).status == "applied"   # 20 back
    clock.advance(60_000)                                     # time is back where it was
    assert (await left(engine, p))["user:bucket"] == 20


# -- 5. concurrency state across daemons with different ttl_s ---------------------------------

async def test_daemons_with_different_ttls_keep_their_own_exact_concurrency_counts(
    redis_client: Redis, clock: Clock
) -> None:
    """During a rolling change of ttl_s, a concurrency limit's sub-buckets differ in width, so
    each ttl keeps its own state (the ttl is in the state id, docs/design.md): each daemon
    holds exactly max_concurrent, and each frees its slots after its own ttl. Sharing one
    state of two widths (the bug) miscounted both."""
    long_ttl = make_engine(redis_client, clock, reservation_ttl_ms=300_000)
    short_ttl = make_engine(redis_client, clock, reservation_ttl_ms=30_000)
    p = tier_plan(concurrent(3))
    admitted = {"long": 0, "short": 0}
    for name, engine in (("long", long_ttl), ("short", short_ttl)) * 4:
        admitted[name] += (await engine.reserve(rq(p))).allowed
    assert admitted == {"long": 3, "short": 3}
    clock.advance(31_000)                        # the short ttl's slots slid out, not the long's
    assert (await short_ttl.reserve(rq(p))).allowed
    assert not (await long_ttl.reserve(rq(p))).allowed


# -- 6. a doomed reserve holds nobody's quota -------------------------------------------------

async def test_a_flood_from_a_spent_ip_does_not_deny_other_org_members(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    tier = Tier("t", (concurrent(3), sliding("org_rq", "requests", "60s", 22, scope="org"),
                      sliding("ip_rq", "requests", "60s", 1, scope="ip")))

    def who(user: str, ip: str) -> Any:
        return plan(tier, Identity(user, "t", org="o1", attributes={"ip": ip}))

    assert (await engine.reserve(rq(who("flooder", "10.0.0.1")))).allowed    # the ip's one
    res = await engine.reserve(rq(who("flooder", "10.0.0.1")))
    assert not res.allowed and reason(res) == "ip_rq"
    flood = [engine.reserve(rq(who("flooder", "10.0.0.1"))) for _ in range(20)]
    members = [engine.reserve(rq(who(f"m{k}", f"10.1.0.{k}"))) for k in range(20)]
    results = await asyncio.gather(*flood, *members)
    assert [reason(r) for r in results[:20]] == ["ip_rq"] * 20   # never max_concurrent
    assert all(r.allowed for r in results[20:]), [reason(r) for r in results[20:]]


# -- 7. a late commit is still charged --------------------------------------------------------

async def test_a_commit_after_the_ttl_charges_its_overrun(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock, reservation_ttl_ms=200)  # the default grace
    p = tier_plan(sliding("tokens", "tokens", "60s", 1000))
    res = await engine.reserve(rq(p, 100, 10))
    await asyncio.sleep(0.3)                          # records live in Redis time
    clock.advance(300)
    done = await engine.commit(res.reservation_id, 100, 410)
    assert done.status == "applied"
    assert (await left(engine, p))["user:tokens"] == 1000 - 510


# -- 8. reservation ids: keyed, and the subject sealed ----------------------------------------

@pytest.fixture
def second_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "second")
    yield server
    server.stop()


async def test_idempotent_ids_differ_across_deployments_and_hide_the_subject(
    redis_client: Redis, clock: Clock, second_redis: RedisServer
) -> None:
    other_client = Redis.from_url(second_redis.url)
    try:
        p = tier_plan(sliding("rq", "requests", "60s", 10))
        ours, theirs = make_engine(redis_client, clock), make_engine(other_client, clock)
        rid = (await ours.reserve(rq(p, idempotency_key="k1"))).reservation_id
        assert (await ours.reserve(rq(p, idempotency_key="k1"))).reservation_id == rid
        assert (await theirs.reserve(rq(p, idempotency_key="k1"))).reservation_id != rid
        for blob in rid[4:].split("."):
            raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
            assert b"user" not in raw and b"u1" not in raw
        # an id pointed at another subject is nobody's
        other = (await ours.reserve(rq(tier_plan(sliding("rq", "requests", "60s", 10),
                                                 user="u2")))).reservation_id
        forged = rid.split(".")[0] + "." + other.split(".")[1]
        assert (await ours.release(forged)).status == "not_found"
    finally:
        await other_client.aclose()


# -- 9. windows too small for 60 sub-buckets --------------------------------------------------

async def test_a_61ms_window_is_conservative_by_at_most_a_sixtieth(
    redis_client: Redis, clock: Clock
) -> None:
    engine = make_engine(redis_client, clock)
    p = tier_plan(_tier_limits("61ms"))
    clock.now -= clock.now % 61                  # a sub-bucket starts here, however wide
    assert (await engine.reserve(rq(p))).allowed
    clock.advance(61)
    assert not (await engine.reserve(rq(p))).allowed   # may still count: one sub-bucket more
    clock.advance(2)                                    # 61 ms + one 61/60 ms sub-bucket
    assert (await engine.reserve(rq(p))).allowed


def test_a_window_under_60ms_is_refused_with_the_bound() -> None:
    with pytest.raises(ConfigError, match=r"window.*at least 60ms"):
        _tier_limits("59ms")
