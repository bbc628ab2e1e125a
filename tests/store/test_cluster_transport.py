"""The cluster transport against a real three-primary Redis Cluster: calls routed by slot and
pipelined per primary, the library on every primary, and the slot map followed as it changes
(MOVED, a new primary) without a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ratelimitd.policy import sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.store.cluster import ClusterTransport
from tests.support.cluster import LocalCluster
from tests.support.quota import rq, tier_plan


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    topology = LocalCluster(Path(tmp_path_factory.mktemp("cluster")), primaries=3)
    yield topology
    topology.stop()


@pytest.fixture
async def engine(cluster: LocalCluster) -> AsyncIterator[Engine]:
    cluster.flushall()
    transport = ClusterTransport(cluster.url, 2.0)
    quota = Engine(transport)
    await quota.load_library()
    yield quota
    await transport.aclose()


def per_minute(limit: int, user: str) -> list:  # type: ignore[type-arg]
    return tier_plan(sliding("requests_per_minute", "requests", "60s", limit), user=user)


async def test_calls_reach_the_primary_of_their_slot_on_every_primary(
        cluster: LocalCluster, engine: Engine) -> None:
    users = [f"user{i}" for i in range(60)]
    results = await asyncio.gather(*(engine.reserve(rq(per_minute(2, u))) for u in users
                                     for _ in range(3)))
    assert sum(r.allowed for r in results) == 2 * len(users)   # 2 of 3 per user, exactly
    holders = {cluster.primary_of(f"rl:{{user:{u}}}").port for u in users}
    assert holders == {p.port for p in cluster.primaries}       # spread over all three
    for u in users[:5]:
        owner = cluster.client(cluster.primary_of(f"rl:{{user:{u}}}"))
        assert owner.exists(f"rl:{{user:{u}}}") == 1
    assert await engine.transport.has_library(engine.scripts.library.name)


async def test_a_moved_slot_is_followed_and_its_state_kept(
        cluster: LocalCluster, engine: Engine) -> None:
    p = per_minute(3, "mover")
    assert (await engine.reserve(rq(p))).allowed
    key = "rl:{user:mover}"
    source = cluster.primary_of(key)
    target = next(n for n in cluster.primaries if n is not source)
    slot = cluster.slot_of(key)
    cluster.move_slot(slot, source, target)
    # the transport still routes the slot to the old owner: MOVED takes it to the new one
    results = [await engine.reserve(rq(p)) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]   # the first call counted
    assert cluster.client(target).exists(key) == 1
    assert cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    cluster.move_slot(slot, target, source)                       # as it was, for the others


async def test_a_slot_mid_migration_is_served_behind_asking(
        cluster: LocalCluster, engine: Engine) -> None:
    p = per_minute(3, "migrant")
    key = "rl:{user:migrant}"
    assert (await engine.reserve(rq(p))).allowed
    source = cluster.primary_of(key)
    target = next(n for n in cluster.primaries if n is not source)
    slot = cluster.slot_of(key)
    cluster.start_migration(slot, source, target)
    transport = engine.transport
    try:
        # the source still owns the slot but no longer has the key: it answers ASK, and the
        # call goes to the target once, behind ASKING
        assert await transport.execute("EXISTS", key) == 1
        assert cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    finally:
        cluster.finish_migration(slot, source, target)
    # (a reserve touches its state and a new record: mid-migration Redis answers TRYAGAIN to
    # such a call until the slot has moved; once it has, the state carried over)
    results = [await engine.reserve(rq(p)) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]


async def test_a_new_primary_gets_the_library_and_serves_its_slots(
        cluster: LocalCluster, engine: Engine, tmp_path: Path) -> None:
    p = per_minute(2, "newcomer")
    key = "rl:{user:newcomer}"
    assert (await engine.reserve(rq(p))).allowed
    source = cluster.primary_of(key)
    newcomer = cluster.add_primary(tmp_path / "newcomer")
    cluster.move_slot(cluster.slot_of(key), source, newcomer)
    results = [await engine.reserve(rq(p)) for _ in range(2)]
    assert [r.allowed for r in results] == [True, False]
    client = cluster.client(newcomer)
    assert client.execute_command("FUNCTION", "LIST", "LIBRARYNAME",
                                  engine.scripts.library.name)
    assert client.exists(key) == 1
    cluster.move_slot(cluster.slot_of(key), newcomer, source)
