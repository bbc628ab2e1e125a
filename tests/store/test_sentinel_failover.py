"""Sentinel failover under load: a primary, a replica and three sentinels on loopback. The
primary is killed while reserves and commits run; the daemon's transport follows the promotion
by itself. With `replicas_ack = 1` every commit answered replicated survives the failover, and
a commit the replicas could not acknowledge says so (`replicated` False): it is done, and the
callers go on while the promoted replica is alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ratelimitd.config import RedisConfig
from ratelimitd.errors import StoreUnavailable
from ratelimitd.policy import sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.store.connect import open_store
from tests.support.cluster import SentinelGroup, wait_until
from tests.support.quota import rq, tier_plan


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    topology = SentinelGroup(tmp_path)
    yield topology
    topology.stop()


@dataclass
class Load:
    """Reserve + commit pairs from concurrent callers, with what each commit answered."""

    engine: Engine
    acknowledged: list[str] = field(default_factory=list)     # commits answered replicated
    unreplicated: list[str] = field(default_factory=list)     # applied, not acknowledged
    failed_commits: list[str] = field(default_factory=list)   # commits answered an error
    last_error_at: float = 0.0
    last_success_at: float = 0.0
    stop: bool = False

    async def caller(self, user: str) -> None:
        p = tier_plan(sliding("requests_per_minute", "requests", "60s", 10**6), user=user)
        while not self.stop:
            try:
                reserved = await self.engine.reserve(rq(p, 10, 10))
            except StoreUnavailable:
                self.last_error_at = time.monotonic()
                await asyncio.sleep(0.02)
                continue
            assert reserved.allowed and reserved.reservation_id is not None
            try:
                result = await self.engine.commit(reserved.reservation_id, 10, 5)
            except StoreUnavailable:
                self.failed_commits.append(reserved.reservation_id)
                self.last_error_at = time.monotonic()
                await asyncio.sleep(0.02)
                continue
            assert result.status == "applied"
            if result.replicated:
                self.acknowledged.append(reserved.reservation_id)
            else:
                self.unreplicated.append(reserved.reservation_id)
            self.last_success_at = time.monotonic()
            await asyncio.sleep(0.005)


async def until(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_killed_primary_is_followed_and_acknowledged_commits_survive(
        group: SentinelGroup) -> None:
    config = RedisConfig(mode="sentinel", url=group.url, timeout_ms=500, replicas_ack=1)
    store = open_store(config, group.url)
    engine = Engine(store.transport)
    load = Load(engine)
    callers = [asyncio.create_task(load.caller(f"user{i}")) for i in range(16)]
    try:
        await until(lambda: len(load.acknowledged) >= 200, 20, "commits before the kill")
        old_port = group.primary.port
        group.primary.proc.kill()
        killed_at = time.monotonic()
        await until(lambda: load.last_error_at > killed_at, 10, "the outage to show")
        wait_until(lambda: group.master_port() == group.replica.port, 20,
                   "the sentinels to promote the replica")
        # the only replica is now the primary: no commit can be made durable until the old
        # primary comes back as the new one's replica, but commits go on, answered not
        # replicated (never an error a retry cannot fix)
        acked_before_return = len(load.acknowledged)
        unreplicated_before = len(load.unreplicated)
        await asyncio.sleep(1.0)
        assert len(load.acknowledged) == acked_before_return
        await until(lambda: len(load.unreplicated) >= unreplicated_before + 50, 10,
                    "commits answered while the promoted replica is alone")
        group.restart(group.primary)
        await until(lambda: len(load.acknowledged) >= acked_before_return + 200, 30,
                    "commits acknowledged again, with the old primary as a replica")
        assert group.master_port() == group.replica.port != old_port
    finally:
        load.stop = True
        await asyncio.gather(*callers)
    # every acknowledged commit is on the new primary: repeating it answers "duplicate"
    repeats = await asyncio.gather(*(engine.commit(rid, 10, 5) for rid in load.acknowledged))
    assert {r.status for r in repeats} == {"duplicate"}
    await engine.aclose()
    await store.aclose()
