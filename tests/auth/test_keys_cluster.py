"""The same operations on a Redis Cluster (one node holding every slot: Redis refuses any
command or script touching keys of two slots with CROSSSLOT, however many nodes there are),
through redis-py's RedisCluster client, pub/sub included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from ratelimitd.abuse import AuthFailureGuard, BlockStore, ip_block_subjects
from ratelimitd.auth.keys import KeyFailure, KeyStore, Pepper, ResolvedKey
from ratelimitd.auth.signatures import SignatureError, SignatureVerifier, sign_request
from ratelimitd.policy import Subject
from tests.support.redis_servers import RedisServer, free_port


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    workdir = Path(tmp_path_factory.mktemp("cluster"))
    # the bus port would default to port + 10000, past 65535 for a high free port
    server = RedisServer(workdir, extra=["--cluster-enabled", "yes", "--cluster-config-file",
                                         str(workdir / "nodes.conf"),
                                         "--cluster-port", str(free_port())])
    node = redis.Redis(port=server.port)
    node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 10
    while b"cluster_state:ok" not in node.execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "INFO"):
        assert time.monotonic() < deadline, "the cluster did not come up"
        time.sleep(0.05)
    node.close()
    yield server
    server.stop()


@pytest.fixture
async def cluster(cluster_node: RedisServer) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster_node.port)
    await client.flushall()
    yield client
    await client.aclose()


async def test_keys_signatures_and_blocks_work_on_a_cluster(cluster: RedisCluster,
                                                            cluster_node: RedisServer,
                                                            pepper: Pepper) -> None:
    admin = KeyStore(cluster, pepper)
    other_client = RedisCluster(host="127.0.0.1", port=cluster_node.port)
    other = KeyStore(other_client, pepper)
    await other.start()
    try:
        assert other.subscribed.is_set()
        created = await admin.create("u1", "pro", org="acme", require_signature=True)
        assert isinstance(await other.resolve(created.api_key), ResolvedKey)
        rotated = await admin.rotate(created.key_id, grace_s=60)
        assert isinstance(await other.resolve(rotated.api_key), ResolvedKey)
        assert (await admin.show(created.key_id)).rotated_to == rotated.key_id
        assert rotated.signing_secret is not None
        verifier = SignatureVerifier(cluster, 300)
        signature = sign_request(rotated.signing_secret, "POST", "/v1/chat", b"{}")
        now_ms = time.time_ns() // 1_000_000
        await verifier.verify(signature, rotated.signing_secret, rotated.key_id, now_ms)
        with pytest.raises(SignatureError):
            await SignatureVerifier(other_client, 300).verify(
                signature, rotated.signing_secret, rotated.key_id, now_ms)
        await admin.revoke(rotated.key_id)
        start = time.monotonic()
        while isinstance(await other.resolve(rotated.api_key), ResolvedKey):
            assert time.monotonic() - start < 1.0
            await asyncio.sleep(0.002)
        refused = await other.resolve(rotated.api_key)
        assert isinstance(refused, KeyFailure) and refused.reason == "revoked"
    finally:
        await other.aclose()
        await other_client.aclose()
    blocks = BlockStore(cluster)
    guard = AuthFailureGuard(cluster, blocks, threshold=2, block_s=60)
    for _ in range(3):
        outcome = await guard.record_failure("2001:db8::7")
    assert outcome.newly_blocked
    await blocks.add(Subject("user", "u{1}"), 60, "manual")
    assert await blocks.check(ip_block_subjects("2001:db8::8")) is not None
    assert {b.subject for b in await blocks.list()} == {
        Subject("ip_prefix", "2001:db8::/64"), Subject("user", "u{1}")}
    assert await blocks.remove(Subject("user", "u{1}"))
