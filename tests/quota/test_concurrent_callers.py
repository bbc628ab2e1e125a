"""Many callers at once: exactly the limit is admitted, whatever the number of engines."""

from __future__ import annotations

import asyncio
import random

from redis.asyncio import BlockingConnectionPool, Redis

from ratelimitd.policy import (
    sliding,
)
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import ReserveRequest, ReserveResult
from tests.support.quota import (
    engine_on,
    left,
    reason,
    rq,
    tier_plan,
)
from tests.support.redis_servers import RedisServer

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
        engines = [engine_on(c) for c in clients]
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
        engines = [engine_on(c) for c in clients]
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


