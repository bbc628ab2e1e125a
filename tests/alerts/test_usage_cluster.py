"""Cost alerts, anomalies and the usage API through a daemon on a real three-node Redis
Cluster: every key the quota calls touch for them is in the subject's slot."""

from __future__ import annotations

from typing import Any

import redis

from ratelimitd.alerts import subject_alerts_key
from ratelimitd.policy import Subject
from tests.alerts.helpers import Receiver, wait_until
from tests.alerts.test_cluster import cluster  # noqa: F401 - the fixture
from tests.alerts.test_http_alerts import AUTH, body, config, spend
from tests.support.http import Serve, call
from tests.support.redis_servers import RedisServer


async def test_alerts_and_anomalies_on_a_cluster(serve: Serve,
                                                 cluster: list[RedisServer]) -> None:  # noqa: F811
    for node in cluster:
        redis.Redis(port=node.port).flushall()
    receiver = Receiver()
    await receiver.start()
    try:
        client = await serve({**config(receiver.url),
                              "redis": {"mode": "cluster", "url": cluster[0].url}},
                             url=cluster[0].url)
        users = [f"c{i}" for i in range(9)]        # their slots fall on all three nodes
        fired: list[dict[str, Any]] = []
        for user in users:
            await spend(client, 400_000, user=user)
            fired += (await spend(client, 10_000, charged=700_000, user=user))["alerts"]
        assert len(fired) == 3 * len(users)
        probe = redis.RedisCluster(host="127.0.0.1", port=cluster[0].port)
        nodes = {probe.get_node_from_key(  # type: ignore[no-untyped-call]
            subject_alerts_key(Subject("user", u))).port for u in users}
        probe.close()
        assert len(nodes) == 3
        await wait_until(lambda: len(receiver.accepted()) == len(fired), "all delivered",
                         timeout_s=30)

        for _ in range(50):
            resp, res = await call(client, "/v1/reserve", body("spiky"))
            assert resp.status == 200, res
        resp, res = await call(client, "/v1/reserve", body("spiky"))
        assert resp.status == 403 and res["error"]["code"] == "blocked"
        resp, usage = await call(client, "/v1/admin/usage?scope=user&id=spiky", method="GET",
                                 headers=AUTH)
        assert resp.status == 200, usage
        assert usage["block"]["reason"] == "request_spike"
        assert [a["kind"] for a in usage["alerts"]] == ["request_spike"]
    finally:
        await receiver.stop()
