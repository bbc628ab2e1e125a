"""Exactness at scale: three daemon processes, 1,200 concurrent clients, one hot subject and
many cold ones, on a standalone Redis and on a 3-primary cluster. Exactly the limit is
admitted on the hot subject and on each cold one, never more, whichever daemon answers."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.cluster import LocalCluster
from tests.support.daemons import DaemonProcess
from tests.support.redis_servers import RedisServer

HOT_LIMIT = 100
HOT_CALLS = 400
COLD_USERS = 200
COLD_LIMIT = 2
COLD_CALLS_EACH = 4          # 400 + 200 x 4 = 1,200 requests in flight at once
# anomaly detection off: the hot subject calls far more than a new subject's baseline
TIERS = f"""
[tiers.hot]
requests_per_minute = {HOT_LIMIT}
anomaly = false
[tiers.cold]
requests_per_minute = {COLD_LIMIT}
anomaly = false
"""


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def redis_toml(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = Path(tmp_path_factory.mktemp(request.param))
    if request.param == "standalone":
        server = RedisServer(workdir)
        yield f'url = "{server.url}"\ntimeout_ms = 5000'
        server.stop()
    else:
        cluster = LocalCluster(workdir, primaries=3)
        yield f'url = "{cluster.url}"\nmode = "cluster"\ntimeout_ms = 5000'
        cluster.stop()


@pytest.fixture
def daemons(redis_toml: str, tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started = [DaemonProcess(tmp_path, redis_toml, TIERS, name=f"d{i}") for i in range(3)]
    try:
        for daemon in started:
            daemon.wait_ready()
        yield started
    finally:
        for daemon in started:
            daemon.stop()


async def reserve(session: aiohttp.ClientSession, url: str, user: str, tier: str
                  ) -> tuple[str, int]:
    body: dict[str, Any] = {"user": user, "tier": tier, "model": "gpt-4o",
                            "input_tokens": 10, "max_output_tokens": 10}
    async with session.post(f"{url}/v1/reserve", json=body) as answer:
        await answer.read()
        return user, answer.status


async def test_exactly_the_limit_is_admitted_across_daemons(
        daemons: list[DaemonProcess]) -> None:
    calls = [("hot", "hot")] * HOT_CALLS + [
        (f"cold{i}", "cold") for i in range(COLD_USERS) for _ in range(COLD_CALLS_EACH)]
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)   # one connection per call
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        answers = await asyncio.gather(*(
            reserve(session, daemons[i % len(daemons)].url, user, tier)
            for i, (user, tier) in enumerate(calls)))
    statuses = Counter(status for _, status in answers)
    assert set(statuses) <= {200, 429}, statuses
    admitted = Counter(user for user, status in answers if status == 200)
    assert admitted["hot"] == HOT_LIMIT
    assert {admitted[f"cold{i}"] for i in range(COLD_USERS)} == {COLD_LIMIT}
    assert sum(statuses.values()) == len(calls)
