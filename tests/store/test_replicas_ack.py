"""`[redis] replicas_ack`: commits and releases wait for N replicas (WAIT on a connection of
their own); reserves, cancels and resizes do not. A write the replicas did not acknowledge in
time is still applied (WAIT never rolls back): it answers success with `"replicated": false`,
and nobody else waits behind it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ratelimitd.config import parse_config
from ratelimitd.errors import ConfigError
from ratelimitd.store.replication import LAG_PROBE_S
from tests.support.cluster import wait_until
from tests.support.http import Serve, call, limit_of, rq, small
from tests.support.redis_servers import RedisServer

TIMEOUT_MS = 2000               # WAIT then waits 1.5 s: far longer than anything else here


@pytest.fixture(name="stalled_replica")
def stalled_replica_fixture(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary whose one replica is online, then stopped (SIGSTOP): it never acknowledges."""
    primary = RedisServer(tmp_path / "primary")
    replica = RedisServer(tmp_path / "replica",
                          extra=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        wait_until(lambda: redis.Redis(port=primary.port).info("replication")
                   .get("slave0", {}).get("state") == "online",
                   10, "the primary to count its replica online")
        os.kill(replica.proc.pid, signal.SIGSTOP)
        yield primary, replica
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()


def _unreplicated(metrics: str, call_name: str) -> float:
    found = re.search(rf'^ratelimitd_unreplicated_settles_total\{{call="{call_name}"\}} (\S+)$',
                      metrics, re.M)
    assert found, metrics
    return float(found.group(1))


async def test_an_unacknowledged_commit_answers_done_not_replicated_and_blocks_nobody(
        serve: Serve, stalled_replica: tuple[RedisServer, RedisServer]) -> None:
    primary, replica = stalled_replica
    org_limit = {"name": "org_rpm", "scope": "org", "metric": "requests", "window": "60s",
                 "limit": 1}
    client = await serve({**small(limits=[org_limit]),
                          "redis": {"url": primary.url, "replicas_ack": 1,
                                    "timeout_ms": TIMEOUT_MS}},
                         url=primary.url)
    _, first = await call(client, "/v1/reserve", rq(input_tokens=100, org="acme"))
    assert first["allowed"] is True, first
    commit = {"reservation_id": first["reservation_id"], "input_tokens": 100,
              "output_tokens": 10}
    committing = asyncio.ensure_future(call(client, "/v1/commit", commit))
    await asyncio.sleep(0.05)           # the commit's WAIT is under way on the primary
    # meanwhile other subjects are served: reserves, and a reserve a later subject denies
    # (whose cancel of the earlier subject is a settle too)
    for n in range(10):
        resp, other = await call(client, "/v1/reserve", rq(user=f"other-{n}", input_tokens=5))
        assert resp.status == 200, other
    resp, denied = await call(client, "/v1/reserve", rq(user="u9", org="acme", input_tokens=5))
    assert resp.status == 429 and denied["reason"] == "org_rpm", denied
    assert not committing.done()         # all of that was answered during the commit's wait
    resp, done = await committing
    assert resp.status == 200, done
    assert done["committed"] is True and done["duplicate"] is False
    assert done["replicated"] is False
    # the gateway's retry, if it makes one: done once, charged once, still not replicated
    resp, again = await call(client, "/v1/commit", commit)
    assert resp.status == 200 and again["duplicate"] is True and again["replicated"] is False
    _, after = await call(client, "/v1/reserve", rq(input_tokens=100))
    assert limit_of(after, "tokens_per_day")["remaining"] == 2000 - 110 - (100 + 300)
    _, released = await call(client, "/v1/release",
                             {"reservation_id": after["reservation_id"]})
    assert released == {"released": True, "duplicate": False, "replicated": False}
    metrics = await (await client.get("/metrics")).text()
    assert _unreplicated(metrics, "commit") == 2
    assert _unreplicated(metrics, "release") == 1
    # the replica is back: once it has caught up, commits are acknowledged again
    os.kill(replica.proc.pid, signal.SIGCONT)
    await asyncio.sleep(LAG_PROBE_S)
    deadline = time.monotonic() + 30
    while True:
        _, fresh = await call(client, "/v1/reserve", rq(user="u3", input_tokens=5))
        _, settled = await call(client, "/v1/commit", {
            "reservation_id": fresh["reservation_id"], "input_tokens": 5, "output_tokens": 1})
        if settled["replicated"] is True or time.monotonic() > deadline:
            break
        await asyncio.sleep(LAG_PROBE_S)
    assert settled["replicated"] is True, settled


async def test_without_replicas_ack_answers_say_nothing_of_replication(serve: Serve) -> None:
    client = await serve(small())
    _, first = await call(client, "/v1/reserve", rq(input_tokens=10))
    _, done = await call(client, "/v1/commit", {"reservation_id": first["reservation_id"],
                                                "input_tokens": 10, "output_tokens": 1})
    assert done["committed"] is True and "replicated" not in done


@pytest.mark.parametrize(("redis_section", "message"), [
    ({"replicas_ack": 17}, "from 0 to 16"),
    ({"replicas_ack": 1}, "embedded Redis has no replicas"),
    ({"replicas_ack": 1, "url": "rediss://h:6379"}, "TLS"),
])
def test_bad_replicas_ack_names_the_key(redis_section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.replicas_ack.*" + message):
        parse_config({"redis": redis_section}, "t.toml")


def test_replicas_ack_defaults_to_zero_and_reads_a_count() -> None:
    assert parse_config({}).redis.replicas_ack == 0
    config = parse_config({"redis": {"url": "redis://h:6379", "replicas_ack": 2}})
    assert config.redis.replicas_ack == 2
