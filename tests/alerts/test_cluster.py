"""The alerts on a real three-node Redis Cluster: every key an alert touches is cluster-safe."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from ratelimitd.alerts import AlertService, append_alert, recent_alerts, subject_alerts_key
from ratelimitd.config import RedisConfig
from ratelimitd.policy import Subject
from ratelimitd.store.connect import RedisClient, connect
from tests.alerts.helpers import Receiver, alerts_config, make_alerts, wait_until
from tests.support.redis_servers import RedisServer, free_port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    root = Path(tmp_path_factory.mktemp("cluster"))
    # the bus port is named: by default it is the port + 10000, past 65535 for a high port
    nodes = [RedisServer(root / str(i), ["--cluster-enabled", "yes", "--cluster-config-file",
                                         "nodes.conf", "--cluster-node-timeout", "2000",
                                         "--cluster-port", str(free_port())])
             for i in range(3)]
    try:
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while not all(b"cluster_state:ok" in redis.Redis(port=n.port).execute_command(
                "CLUSTER", "INFO") for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
async def cluster_client(cluster: list[RedisServer]) -> AsyncIterator[RedisClient]:
    url = cluster[0].url
    client = connect(RedisConfig(mode="cluster", url=url, timeout_ms=1000), url)
    for node in cluster:
        redis.Redis(port=node.port).flushall()
    yield client
    await client.aclose()


async def test_subjects_alerts_and_the_outbox_work_across_slots(cluster_client):
    alerts = make_alerts(12)  # twelve users: their keys fall on all three nodes
    for alert in alerts:
        await append_alert(cluster_client, alert)
    nodes = {cluster_client.get_node_from_key(subject_alerts_key(a.subject)).port
             for a in alerts}
    assert len(nodes) == 3
    for alert in alerts:
        assert await recent_alerts(cluster_client, alert.subject) == [alert]
    assert await recent_alerts(cluster_client, Subject("user", "nobody")) == []

    hook = Receiver()
    await hook.start()
    service = AlertService(cluster_client, alerts_config(hook.url), poll_interval_s=0.05,
                           retry_base_s=0.05)
    try:
        await service.start()
        service.submit(alerts + alerts[:2])
        ids = {a.id for a in alerts}
        await wait_until(lambda: set(hook.accepted()) == ids, "every alert")
        await wait_until(lambda: service.stats.duplicates == 2, "the repeats refused")
        assert hook.accepted() == dict.fromkeys(ids, 1)
    finally:
        await service.aclose()
        await hook.stop()
