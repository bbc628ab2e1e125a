"""Quota under Redis faults: every subject counts exactly what was granted.

Two daemons' engines (each with its own connections, on the production transport) serve a
gateway's load (tests/support/fault_load.py: user, org and global on every reserve, half the
grants committed, failed reserves retried with their idempotency key) while a real
redis-server is stalled (SIGSTOP, then `DEBUG SLEEP` from a side connection), both past the
100 ms call timeout, and killed (SIGKILL) and restarted on its port with its data (AOF fsynced
on every write: what Redis answered survives). Once Redis answers again, the failed commits are
retried and the engines' compensators have drained, every limit of every subject must count
exactly what the granted reserves (and their commits) charge: nothing for a reserve that
failed, however far it got.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ratelimitd.config import RedisConfig
from ratelimitd.errors import StoreUnavailable
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import ReserveRequest
from ratelimitd.store.connect import Store, open_store
from tests.support.fault_load import (
    Book,
    counted,
    drained,
    gateway,
    plans,
    settle_leftovers,
)
from tests.support.faults import DurableRedis, command
from tests.support.quota import PRICES

WORKERS = 12
DRAIN_S = 30.0


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path / "redis", ["--enable-debug-command", "yes"])
    yield server
    server.stop()


@pytest.fixture
async def daemons(durable_redis: DurableRedis) -> AsyncIterator[list[Engine]]:
    """Two daemons' engines, each on its own store (the pipelined standalone transport)."""
    stores: list[Store] = [open_store(RedisConfig(url=durable_redis.url, timeout_ms=100),
                                      durable_redis.url) for _ in range(2)]
    engines = [Engine(store.transport) for store in stores]
    yield engines
    for engine, store in zip(engines, stores, strict=True):
        await engine.aclose()
        await store.aclose()


async def _faults(server: DurableRedis, book: Book) -> list[int]:
    """Stalls, sleeps and kills Redis between spells of normal load; returns how many grants
    there were after each fault (the load must go on)."""
    progress = []
    await asyncio.sleep(0.5)
    server.stall()                                   # SIGSTOP: every call in flight times out
    await asyncio.sleep(0.6)
    server.resume()
    await asyncio.sleep(0.5)
    progress.append(len(book.grants))
    await asyncio.to_thread(command, server.port, "DEBUG", "SLEEP", 0.5,
                            timeout_s=5)   # Redis busy, from a side door
    await asyncio.sleep(0.5)
    progress.append(len(book.grants))
    server.kill()                                    # SIGKILL mid-load, then back on its port
    await asyncio.sleep(0.3)
    await asyncio.to_thread(server.restart)
    await asyncio.sleep(0.8)
    progress.append(len(book.grants))
    return progress


async def test_counters_equal_the_granted_reserves_after_stalls_and_a_kill(
    durable_redis: DurableRedis, daemons: list[Engine]
) -> None:
    users = [f"u{k}" for k in range(8)]
    all_plans = plans(users)
    book = Book()
    stop = asyncio.Event()
    workers = [asyncio.create_task(gateway(daemons[k % 2], all_plans, book, stop,
                                           random.Random(k))) for k in range(WORKERS)]
    before = len(book.grants)
    progress = await _faults(durable_redis, book)
    stop.set()
    await asyncio.gather(*workers)
    # the faults happened, and the load went on between them
    assert book.failed_reserves > 0
    assert before < progress[0] < progress[1] < progress[2] < len(book.grants) + 1, progress
    assert book.denied > 0                            # o2's org denied: undone reserves too
    await settle_leftovers(daemons[0], book, DRAIN_S)
    await drained(daemons, DRAIN_S)
    expected = book.expected_used()
    got = await counted(daemons[0], all_plans)
    wrong = {k: (got.get(k, 0), expected.get(k, 0)) for k in set(got) | set(expected)
             if got.get(k, 0) != expected.get(k, 0)}
    assert not wrong, f"(counted, granted) differ: {wrong}; {len(book.grants)} grants"


async def test_the_cancels_an_outage_leaves_drain_soon_after_redis_answers(
    durable_redis: DurableRedis, daemons: list[Engine]
) -> None:
    """Reserves that failed during a stall leave a cancel each to retry; once Redis answers,
    the queue goes at Redis speed (a cancel every 50 ms took 20 s for these 400)."""
    all_plans = plans(["u0", "u1"])
    engine = daemons[0]
    warm = await engine.reserve(ReserveRequest(all_plans[0], 10, 20, PRICES))
    assert (await engine.release(warm.reservation_id)).status == "applied"
    durable_redis.stall()
    try:
        failed = await asyncio.gather(*(
            engine.reserve(ReserveRequest(all_plans[k % 2], 10, 20, PRICES))
            for k in range(400)), return_exceptions=True)
    finally:
        durable_redis.resume()
    assert all(isinstance(f, StoreUnavailable) for f in failed)
    assert len(engine.compensator.pending) >= 300
    await drained([engine], 5.0)
    got = await counted(engine, all_plans)
    assert got and set(got.values()) == {0}
