"""Redis server time and memory of the quota engine, beside the `limits` library.

Runs against a fresh redis-server it starts itself (loopback, free port), so every number
comes from the same machine in the same run:
  * server time per call (INFO commandstats, usec per call) of a 4-limit reserve with its
    reservation record, of a commit, and of one sliding-window-counter hit of `limits`, each
    measured twice: under load (64 concurrent callers, so Redis runs call after call, as it
    does behind a busy daemon) and one call at a time (an idle Redis, where every call also
    pays for cold CPU caches). The three take turns in short batches (`limits` hits, then as
    many reserves, then their commits), and each batch's reserve and commit are divided by the
    `limits` hit just before them: a shared machine's speed drifts within seconds, and a ratio
    of two measures taken far apart (one best of many runs against another) shows that drift
    as much as the code. The report is the median ratio over the batches, and its quartiles;
  * Redis memory per active subject of the default free tier, with its sub-buckets filled as a
    busy day would fill them, and per reservation record.
Reserves check anomalies on their user (lua/anomaly.lua) and commits the default cost alert
thresholds, as the daemon's do (bench/usage_bench.py compares with the code before them).
Usage: python bench/engine_bench.py [--batches 20] [--batch-calls 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage as AsyncRedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter as AsyncSlidingWindowCounter
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
# The goal: a reserve (and a commit) at most this many `limits` hits
TARGET_RATIO = 2.5


def script_usec(client: redis.Redis) -> tuple[int, int]:
    """Server time of every EVALSHA (`limits`) and every FCALL (ours) so far.

    A script's time includes the commands it runs (which commandstats also lists on their own,
    so summing every command would count twice).
    """
    stats = client.info("commandstats")
    return (int(stats.get("cmdstat_evalsha", {}).get("usec", 0)),
            int(stats.get("cmdstat_fcall", {}).get("usec", 0)))


async def each(first: int, calls: int, concurrency: int,
               call: Callable[[int], Awaitable[object]]) -> None:
    """call(first .. first+calls-1), by `concurrency` callers at once."""
    async def caller(start: int) -> None:
        for i in range(start, first + calls, concurrency):
            await call(i)
    await asyncio.gather(*(caller(first + c) for c in range(concurrency)))


async def interleaved(client: redis.Redis, url: str, concurrency: int, batches: int,
                      batch_calls: int) -> list[tuple[float, float, float]]:
    """(limits hit, reserve, commit) µs per call of each batch, `concurrency` callers at once."""
    client.flushall()
    aclient = Redis.from_url(url)
    engine = Engine(BatchTransport(aclient, None))
    await engine.load_library()
    # The free tier's four limits, with room enough that every reserve is admitted.
    tier = Tier("bench", shorthand_limits(10**9, 10**12, 10.0**6, 10**6), max_output_tokens=500)
    plans = [plan(tier, Identity(f"user{i}", "bench")) for i in range(USERS)]
    limiter = AsyncSlidingWindowCounter(AsyncRedisStorage(f"async+{url}",
                                                          implementation="redispy"))
    item = RateLimitItemPerMinute(10**9)
    rids: dict[int, str] = {}

    async def hit(i: int) -> None:
        await limiter.hit(item, f"user{i % USERS}")

    async def reserve(i: int) -> None:
        result = await engine.reserve(ReserveRequest(plans[i % USERS], 120, 500, PRICES,
                                                     anomaly=True))
        assert result.allowed
        rids[i] = result.reservation_id

    async def commit(i: int) -> None:
        await engine.commit(rids.pop(i), 120, 80)

    for i in range(50):  # the scripts loaded, the first subjects made, before measuring
        await hit(i)
        await reserve(i)
        await commit(i)
    per_batch = []
    for b in range(batches):
        first = 50 + b * batch_calls
        usec = [script_usec(client)]
        for call in (hit, reserve, commit):
            await each(first, batch_calls, concurrency, call)
            usec.append(script_usec(client))
        per_batch.append(((usec[1][0] - usec[0][0]) / batch_calls,
                          (usec[2][1] - usec[1][1]) / batch_calls,
                          (usec[3][1] - usec[2][1]) / batch_calls))
    await aclient.aclose()
    return per_batch


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


def summary(values: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return f"{median:.2f}x ({q1:.2f} to {q3:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-calls", type=int, default=1000)
    parser.add_argument("--subjects", type=int, default=200)
    args = parser.parse_args()
    regimes = {f"under load ({CONCURRENCY} callers)": CONCURRENCY, "one call at a time": 1}
    runs: dict[str, list[tuple[float, float, float]]] = {}
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
            for name, concurrency in regimes.items():
                runs[name] = asyncio.run(interleaved(client, server.url, concurrency,
                                                     args.batches, args.batch_calls))
            per_subject, per_record = asyncio.run(bench_memory(server.url, args.subjects))
        finally:
            server.stop()
    print(f"redis-server {version}; {args.batches} batches of {args.batch_calls} `limits` hits, "
          "then as many reserves, then their commits; server time from INFO commandstats")
    print("| regime | `limits` hit | reserve | commit | reserve / `limits` | commit / `limits` "
          f"| both <= {TARGET_RATIO}x |")
    print("|---|---|---|---|---|---|---|")
    for name, batches in runs.items():
        hit, reserve, commit = (statistics.median(b[k] for b in batches) for k in range(3))
        reserve_ratios = [r / h for h, r, _ in batches]
        commit_ratios = [c / h for h, _, c in batches]
        worst = max(statistics.median(reserve_ratios), statistics.median(commit_ratios))
        print(f"| {name} | {hit:.2f} µs | {reserve:.2f} µs | {commit:.2f} µs | "
              f"{summary(reserve_ratios)} | {summary(commit_ratios)} | "
              f"{'met' if worst <= TARGET_RATIO else 'MISSED'} |")
    print("(µs: medians over the batches; ratios: the median of each batch's ratio, then its "
          "quartiles)")
    print()
    print(f"memory, default free tier, rings filled by a busy day ({args.subjects} subjects):")
    print(f"  limit state per active subject: {per_subject:.0f} bytes "
          f"(target <= 2120: {'met' if per_subject <= 2120 else 'MISSED'})")
    print(f"  per reservation record (kept ttl_s after commit): {per_record:.0f} bytes")


if __name__ == "__main__":
    main()
