"""`[redis] replicas_ack`: each settle waits for N replicas (WAIT on the same connection);
reserves do not. Fewer acknowledgements are an error to the caller, never a success."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from ratelimitd.config import RedisConfig, parse_config
from ratelimitd.errors import ConfigError, StoreUnavailable
from ratelimitd.policy import sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.runner import shipped_library
from ratelimitd.store.connect import open_store
from ratelimitd.store.replication import SETTLE_SUFFIX
from tests.support.cluster import wait_until
from tests.support.quota import rq, tier_plan
from tests.support.redis_servers import RedisServer


def test_only_the_settle_function_waits() -> None:
    library = shipped_library()
    assert library.settle.function.endswith(SETTLE_SUFFIX)
    assert not library.reserve.function.endswith(SETTLE_SUFFIX)


async def test_a_commit_no_replica_acknowledged_is_an_error_and_a_retry_completes_it(
        tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary")
    config = RedisConfig(url=primary.url, timeout_ms=1000, replicas_ack=1)
    store = open_store(config, primary.url)
    engine = Engine(store.transport)
    replica: RedisServer | None = None
    try:
        p = tier_plan(sliding("requests_per_minute", "requests", "60s", 5), user="durable")
        reserved = await engine.reserve(rq(p))                 # reserves do not wait
        assert reserved.allowed and reserved.reservation_id is not None
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="0 of the 1 replicas"):
            await engine.commit(reserved.reservation_id, 10, 5)
        assert time.monotonic() - started < 1.0 + 0.05       # bounded by the timeout
        replica = RedisServer(tmp_path / "replica",
                              extra=["--replicaof", "127.0.0.1", str(primary.port)])
        wait_until(lambda: redis.Redis(port=primary.port).info("replication")
                   .get("slave0", {}).get("state") == "online",
                   10, "the primary to count its replica online")
        # the gateway's retry: the commit was applied on the primary, now it is acknowledged
        retried = await engine.commit(reserved.reservation_id, 10, 5)
        assert retried.status == "duplicate"
        fresh = await engine.reserve(rq(p))
        assert fresh.reservation_id is not None
        assert (await engine.commit(fresh.reservation_id, 10, 5)).status == "applied"
    finally:
        await engine.aclose()
        await store.aclose()
        if replica is not None:
            replica.stop()
        primary.stop()


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
