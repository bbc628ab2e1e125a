"""Cluster failover under load: three primaries with a replica each. The primary that the
daemon was configured with (its only seed) is killed while reserves and commits run; its
replica takes over and the cluster transport finds it from the nodes it already knows, with no
restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimitd.errors import StoreUnavailable
from ratelimitd.policy import sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.store.cluster import ClusterTransport
from tests.support.cluster import LocalCluster
from tests.support.quota import rq, tier_plan


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    topology = LocalCluster(tmp_path, primaries=3, replicas=1)
    yield topology
    topology.stop()


async def test_a_killed_primary_is_replaced_and_the_daemon_recovers_by_itself(
        cluster: LocalCluster) -> None:
    transport = ClusterTransport(cluster.url, 0.5)
    engine = Engine(transport)
    await engine.load_library()
    victim = cluster.primaries[0]
    users = [f"user{i}" for i in range(40)]
    on_victim = [u for u in users if cluster.primary_of(f"rl:{{user:{u}}}") is victim]
    assert on_victim, "some subjects live on the primary that is killed"
    successes: dict[str, float] = {}
    failures: list[float] = []
    stop = False

    async def caller(user: str) -> None:
        p = tier_plan(sliding("requests_per_minute", "requests", "60s", 10**6), user=user)
        while not stop:
            try:
                reserved = await engine.reserve(rq(p, 10, 10))
                assert reserved.allowed and reserved.reservation_id is not None
                await engine.commit(reserved.reservation_id, 10, 5)
                successes[user] = time.monotonic()
            except StoreUnavailable:
                failures.append(time.monotonic())
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(caller(u)) for u in users]
    try:
        await asyncio.sleep(1.0)
        assert set(successes) == set(users)
        victim.proc.kill()
        killed_at = time.monotonic()
        deadline = killed_at + 30
        while not all(successes[u] > killed_at + 0.5 for u in on_victim):
            assert time.monotonic() < deadline, "the subjects of the killed primary never recovered"
            await asyncio.sleep(0.1)
        recovered_in = time.monotonic() - killed_at
    finally:
        stop = True
        await asyncio.gather(*tasks)
    assert any(t > killed_at for t in failures)          # the outage was seen, then ended
    promoted = cluster.primary_of(f"rl:{{user:{on_victim[0]}}}")
    assert promoted is not victim and promoted in cluster.replicas
    assert cluster.client(promoted).execute_command(
        "FUNCTION", "LIST", "LIBRARYNAME", engine.scripts.library.name)
    assert recovered_in < 30
    await engine.aclose()
    await transport.aclose()
