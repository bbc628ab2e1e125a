"""Redis server time and memory of the quota engine, beside the `limits` library.

Runs against a fresh redis-server it starts itself (loopback, free port), so every number
comes from the same machine in the same run:
  * server time per call (INFO commandstats, usec per call) of a 4-limit reserve with its
    reservation record, of a commit, and of one sliding-window-counter hit of `limits`, each
    measured twice: under load (64 concurrent callers, so Redis runs call after call, as it
    does behind a busy daemon) and one call at a time (an idle Redis, where every call also
    pays for cold CPU caches);
  * Redis memory per active subject of the default free tier, with its sub-buckets filled as a
    busy day would fill them, and per reservation record.
Reserves check anomalies on their user (lua/anomaly.lua) and commits the default cost alert
thresholds, as the daemon's do (bench/usage_bench.py compares with the code before them).
Usage: python bench/engine_bench.py [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage as AsyncRedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter as AsyncSlidingWindowCounter
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratelimitd.policy import Identity, Prices, Tier, default_tiers, plan, shorthand_limits
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import ReserveRequest
from ratelimitd.store.transport import BatchTransport
from tests.support.redis_servers import RedisServer

PRICES = Prices(input=3_000_000, output=15_000_000, cached_input=1_500_000)
USERS = 1000
CONCURRENCY = 64


def script_usec(client: redis.Redis) -> int:
    """Server time of every script run since the last CONFIG RESETSTAT.

    Each call is one EVALSHA (`limits`) or FCALL (ours); its time includes the commands it runs
    (which commandstats also lists on their own, so summing every command would count twice).
    """
    stats = client.info("commandstats")
    calls = ("evalsha", "eval", "fcall")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in calls)


async def each(calls: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> None:
    """call(0 .. calls-1), by `concurrency` callers at once."""
    async def caller(first: int) -> None:
        for i in range(first, calls, concurrency):
            await call(i)
    await asyncio.gather(*(caller(c) for c in range(concurrency)))


def bench_limits_sequential(client: redis.Redis, url: str, calls: int) -> float:
    client.flushall()
    limiter = SlidingWindowCounterRateLimiter(RedisStorage(url))
    item = RateLimitItemPerMinute(10**9)
    for i in range(50):                       # load the script before measuring
        limiter.hit(item, f"warm{i}")
    client.config_resetstat()
    for i in range(calls):
        limiter.hit(item, f"user{i % USERS}")
    return script_usec(client) / calls


async def bench_limits_loaded(client: redis.Redis, url: str, calls: int) -> float:
    client.flushall()
    storage = AsyncRedisStorage(f"async+{url}", implementation="redispy")
    limiter = AsyncSlidingWindowCounter(storage)
    item = RateLimitItemPerMinute(10**9)
    for i in range(50):
        await limiter.hit(item, f"warm{i}")
    client.config_resetstat()
    await each(calls, CONCURRENCY, lambda i: limiter.hit(item, f"user{i % USERS}"))
    return script_usec(client) / calls


async def bench_engine(client: redis.Redis, url: str, calls: int, concurrency: int
                       ) -> tuple[float, float]:
    client.flushall()
    aclient = Redis.from_url(url)
    engine = Engine(BatchTransport(aclient, None))
    await engine.load_library()
    # The free tier's four limits, with room enough that every reserve is admitted.
    tier = Tier("bench", shorthand_limits(10**9, 10**12, 10.0**6, 10**6), max_output_tokens=500)
    plans = [plan(tier, Identity(f"user{i}", "bench")) for i in range(USERS)]
    rids = [""] * calls

    async def reserve(i: int) -> None:
        result = await engine.reserve(ReserveRequest(plans[i % USERS], 120, 500, PRICES,
                                                     anomaly=True))
        assert result.allowed
        rids[i] = result.reservation_id

    client.config_resetstat()
    await each(calls, concurrency, reserve)
    reserve_usec = script_usec(client) / calls
    client.config_resetstat()
    await each(calls, concurrency, lambda i: engine.commit(rids[i], 120, 80))
    commit_usec = script_usec(client) / calls
    await aclient.aclose()
    return reserve_usec, commit_usec


async def bench_memory(url: str, subjects: int) -> tuple[float, float]:
    """Bytes per subject (limit state) and per reservation record, free tier, busy day."""
    aclient = Redis.from_url(url)
    await aclient.flushall()
    now = [1_764_000_000_000]
    engine = Engine.with_test_clock(BatchTransport(aclient, None), lambda: now[0])
    free = default_tiers()["free"]
    plans = [plan(free, Identity(f"member-{i:06d}", "free")) for i in range(subjects)]
    # One call in each of the 61 sub-buckets of tokens_per_day (24 min apart), then 9 more
    # within the last minute: every ring the free tier has is as full as its limits allow.
    steps = [24 * 60_000] * 61 + [6_000] * 9
    rids: list[str] = []
    for step in steps:
        now[0] += step
        for p in plans:
            r = await engine.reserve(ReserveRequest(p, 20, 16, PRICES, anomaly=True))
            assert r.allowed, r.denied_by
            await engine.commit(r.reservation_id, 20, 10)
            rids.append(r.reservation_id)
    state = 0
    for i in range(subjects):
        for key in await aclient.keys(f"rl:{{user:member-{i:06d}}}*"):
            if b":r:" not in key:
                state += await aclient.memory_usage(key) or 0
    records = [k async for k in aclient.scan_iter(match="rl:*:r:*", count=1000)]
    record_bytes = sum([await aclient.memory_usage(k) or 0 for k in records[:2000]])
    await aclient.aclose()
    return state / subjects, record_bytes / min(len(records), 2000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds; each side keeps its best (the VM is noisy)")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {}

    def keep(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        if (os.cpu_count() or 1) >= 2:
            # Redis on a CPU of its own, as on its own host: the client's work between calls
            # does not evict Redis' caches (which cost the larger script more)
            os.sched_setaffinity(server.proc.pid, {1})
            os.sched_setaffinity(0, {0})
        try:
            client = redis.Redis(port=server.port)
            version = client.info("server")["redis_version"]
            for _ in range(args.rounds):
                keep("limits loaded", asyncio.run(
                    bench_limits_loaded(client, server.url, args.calls)))
                reserve, commit = asyncio.run(
                    bench_engine(client, server.url, args.calls, CONCURRENCY))
                keep("reserve loaded", reserve)
                keep("commit loaded", commit)
                keep("limits sequential", bench_limits_sequential(client, server.url, args.calls))
                reserve, commit = asyncio.run(bench_engine(client, server.url, args.calls, 1))
                keep("reserve sequential", reserve)
                keep("commit sequential", commit)
            per_subject, per_record = asyncio.run(bench_memory(server.url, args.subjects))
        finally:
            server.stop()
    best = {name: min(values) for name, values in runs.items()}
    print(f"redis-server {version}, {args.calls} calls each, best of {args.rounds} alternating "
          "rounds, server time from INFO commandstats")
    print(f"| what | under load ({CONCURRENCY} callers) | vs `limits` | one call at a time "
          "| vs `limits` |")
    print("|---|---|---|---|---|")
    rows = [("`limits` sliding-window-counter hit (baseline)", "limits"),
            ("reserve, 4 limits + reservation record", "reserve"), ("commit", "commit")]
    for label, key in rows:
        cells = []
        for mode in ("loaded", "sequential"):
            usec, ratio = best[f"{key} {mode}"], best[f"{key} {mode}"] / best[f"limits {mode}"]
            verdict = f" (target <= 3x: {'met' if ratio <= 3 else 'MISSED'})" \
                if key == "reserve" else ""
            cells += [f"{usec:.2f} µs", f"{ratio:.2f}x{verdict}"]
        print(f"| {label} | {' | '.join(cells)} |")
    print()
    print(f"memory, default free tier, rings filled by a busy day ({args.subjects} subjects):")
    print(f"  limit state per active subject: {per_subject:.0f} bytes "
          f"(target <= 3072: {'met' if per_subject <= 3072 else 'MISSED'})")
    print(f"  per reservation record (kept ttl_s after commit): {per_record:.0f} bytes")


if __name__ == "__main__":
    main()
