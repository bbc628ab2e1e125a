"""Quota under faults on a real 3-primary Redis Cluster.

As tests/quota/test_faults.py, on a cluster the fixture builds (three redis-servers with
`--cluster-enabled yes`, joined by `redis-cli --cluster create`, AOF fsynced on every write):
the primary of the global subject is stalled (SIGSTOP) past the call timeout, the primary of
an org is made busy (`DEBUG SLEEP`), and the primary of the other org is killed (SIGKILL) and
restarted on its port, so reserves are cut short between slots on different nodes. Once every
node answers again, every limit of every subject must count exactly what was granted.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ratelimitd.config import RedisConfig
from ratelimitd.quota.engine import Engine
from ratelimitd.store.connect import Store, open_store
from tests.support.fault_load import (
    Book,
    counted,
    drained,
    gateway,
    plans,
    settle_leftovers,
)
from tests.support.faults import DurableCluster, command

WORKERS = 12
DRAIN_S = 30.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[DurableCluster]:
    made = DurableCluster(tmp_path / "cluster")
    yield made
    made.stop()


@pytest.fixture
async def daemons(cluster: DurableCluster) -> AsyncIterator[list[Engine]]:
    config = RedisConfig(url=cluster.url, mode="cluster", timeout_ms=100)
    stores: list[Store] = [open_store(config, cluster.url) for _ in range(2)]
    engines = [Engine(store.transport) for store in stores]
    yield engines
    for engine, store in zip(engines, stores, strict=True):
        await engine.aclose()
        await store.aclose()


async def test_counters_equal_the_granted_reserves_after_node_stalls_and_a_kill(
    cluster: DurableCluster, daemons: list[Engine]
) -> None:
    all_plans = plans([f"u{k}" for k in range(8)])
    global_node = cluster.node_of("rl:{global:*}")
    # the orgs' nodes, other than the global one where the slots allow
    org_nodes = [cluster.node_of(f"rl:{{org:{org}}}") for org in ("o1", "o2")]
    killed = next((n for n in org_nodes if n is not global_node), org_nodes[1])
    busy = next(n for n in cluster.nodes if n is not killed)
    subject_nodes = {cluster.node_of(f"rl:{{{s.tag}}}").port for p in all_plans for s, _ in p}
    assert len(subject_nodes) == 3                       # the subjects span every node

    book = Book()
    stop = asyncio.Event()
    workers = [asyncio.create_task(gateway(daemons[k % 2], all_plans, book, stop,
                                           random.Random(k))) for k in range(WORKERS)]
    progress = []
    await asyncio.sleep(0.6)
    global_node.stall()
    await asyncio.sleep(0.6)
    global_node.resume()
    await asyncio.sleep(0.6)
    progress.append(len(book.grants))
    await asyncio.to_thread(command, busy.port, "DEBUG", "SLEEP", 0.5, timeout_s=5)
    await asyncio.sleep(0.6)
    progress.append(len(book.grants))
    killed.kill()
    await asyncio.sleep(0.3)
    await asyncio.to_thread(killed.restart)
    await asyncio.to_thread(cluster.wait_ok)
    await asyncio.sleep(1.0)
    progress.append(len(book.grants))
    stop.set()
    await asyncio.gather(*workers)
    assert book.failed_reserves > 0 and book.denied > 0
    assert 0 < progress[0] < progress[1] < progress[2] < len(book.grants) + 1, progress

    await settle_leftovers(daemons[0], book, DRAIN_S)
    await drained(daemons, DRAIN_S)
    expected = book.expected_used()
    got = await counted(daemons[0], all_plans)
    wrong = {k: (got.get(k, 0), expected.get(k, 0)) for k in set(got) | set(expected)
             if got.get(k, 0) != expected.get(k, 0)}
    assert not wrong, f"(counted, granted) differ: {wrong}; {len(book.grants)} grants"
