"""The store's connections against real redis-servers: the pipelined connection of the hot
path, the transport each mode gets, and sentinel mode."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from ratelimitd.config import RedisConfig
from ratelimitd.errors import StoreReplyError, StoreUnavailable
from ratelimitd.policy import sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.store.cluster import ClusterTransport
from ratelimitd.store.connect import open_store
from ratelimitd.store.pipeline import PipelinedConnection
from ratelimitd.store.transport import BatchTransport, PipeTransport
from tests.support.quota import rq, tier_plan
from tests.support.redis_servers import RedisServer, free_port, redis_binary


async def test_authenticates_and_uses_the_database_of_its_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret pass")
    pipe = PipelinedConnection(f"redis://:s3cret%20pass@127.0.0.1:{server.port}/3", 1.0)
    try:
        assert await pipe.call("SET", "greeting", "hello") == b"OK"
        db3 = redis.Redis(port=server.port, password="s3cret pass", db=3)
        db0 = redis.Redis(port=server.port, password="s3cret pass", db=0)
        assert db3.get("greeting") == b"hello"
        assert db0.get("greeting") is None
    finally:
        await pipe.aclose()
        server.stop()


async def test_a_wrong_password_fails_as_an_unavailable_store(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="right")
    pipe = PipelinedConnection(f"redis://:wrong@127.0.0.1:{server.port}/0", 1.0)
    try:
        with pytest.raises(StoreUnavailable):
            await pipe.call("PING")
    finally:
        await pipe.aclose()
        server.stop()


async def test_thousands_of_concurrent_calls_each_get_their_own_reply(
    redis_server: RedisServer,
) -> None:
    pipe = PipelinedConnection(redis_server.url, 5.0)
    try:
        replies = await asyncio.gather(*(pipe.call("ECHO", f"call-{i}") for i in range(3000)))
    finally:
        await pipe.aclose()
    assert replies == [f"call-{i}".encode() for i in range(3000)]


async def test_an_error_reply_raises_and_the_connection_goes_on(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    await redis_client.set("not-a-number", "abc")
    pipe = PipelinedConnection(redis_server.url, 1.0)
    try:
        results = await asyncio.gather(pipe.call("INCR", "not-a-number"), pipe.call("PING"),
                                       return_exceptions=True)
        assert isinstance(results[0], StoreReplyError) and "not an integer" in str(results[0])
        assert results[1] == b"PONG"
        assert await pipe.call("ECHO", "still here") == b"still here"
    finally:
        await pipe.aclose()


async def test_a_stalled_redis_fails_calls_in_time_and_a_later_call_reconnects(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path)
    pipe = PipelinedConnection(server.url, 0.2)
    try:
        assert await pipe.call("PING") == b"PONG"
        server.proc.send_signal(signal.SIGSTOP)          # Redis stops answering
        started = time.monotonic()
        results = await asyncio.gather(*(pipe.call("PING") for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) and r.timeout for r in results), results
        assert time.monotonic() - started < 1.0
        server.proc.send_signal(signal.SIGCONT)
        # calls fail at once until a new connection answers PING in the background; then
        # they go through it
        deadline = time.monotonic() + 2
        while True:
            try:
                assert await pipe.call("ECHO", "back") == b"back"
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
    finally:
        server.proc.send_signal(signal.SIGCONT)
        await pipe.aclose()
        server.stop()


async def test_a_redis_that_is_gone_fails_calls_with_a_connection_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    pipe = PipelinedConnection(server.url, 1.0)
    assert await pipe.call("PING") == b"PONG"
    server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await pipe.call("PING")
        with pytest.raises(StoreUnavailable):                 # and cannot connect again
            await pipe.call("PING")
    finally:
        await pipe.aclose()


async def test_500_concurrent_reserves_through_the_pipe_admit_exactly_the_limit(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    pipe = PipelinedConnection(redis_server.url, 5.0)
    try:
        engine = Engine(PipeTransport(pipe, 5.0))
        p = tier_plan(sliding("requests_per_minute", "requests", "60s", 100), user="piped")
        results = await asyncio.gather(*(engine.reserve(rq(p, 10, 10)) for _ in range(500)))
        admitted = [r for r in results if r.allowed]
        assert len(admitted) == 100
        commits = await asyncio.gather(*(engine.commit(r.reservation_id, 10, 5)
                                         for r in admitted))
        assert {c.status for c in commits} == {"applied"}
    finally:
        await pipe.aclose()


def test_the_hot_path_pipelines_in_every_mode_but_tls() -> None:
    def transport(config: RedisConfig, url: str) -> type:
        return type(open_store(config, url).transport)

    assert transport(RedisConfig(), "redis://127.0.0.1:6379/0") is PipeTransport
    assert transport(RedisConfig(), "unix:///run/redis.sock") is PipeTransport
    assert transport(RedisConfig(), "rediss://127.0.0.1:6379/0") is BatchTransport  # TLS
    cluster = RedisConfig(mode="cluster", url="redis://127.0.0.1:7000/0")
    assert transport(cluster, cluster.url) is ClusterTransport
    sentinel = RedisConfig(mode="sentinel", url="redis+sentinel://127.0.0.1:26379/quotas")
    assert transport(sentinel, sentinel.url) is PipeTransport


async def test_calls_past_the_in_flight_bound_fail_at_once(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    pipe = PipelinedConnection(server.url, 0.5, max_in_flight=10)
    try:
        assert await pipe.call("PING") == b"PONG"
        server.proc.send_signal(signal.SIGSTOP)          # replies stop: calls pile up
        results = await asyncio.gather(*(pipe.call("PING") for _ in range(15)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, StoreUnavailable) and not r.timeout]
        timed_out = [r for r in results if isinstance(r, StoreUnavailable) and r.timeout]
        assert len(refused) == 5 and "10 calls already wait" in str(refused[0])
        assert len(timed_out) == 10
    finally:
        server.proc.send_signal(signal.SIGCONT)
        await pipe.aclose()
        server.stop()


def start_sentinel(workdir: Path, master_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server in sentinel mode watching the master as service "quotas"."""
    port = free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                    f"sentinel monitor quotas 127.0.0.1 {master_port} 1\n")
    proc = subprocess.Popen([redis_binary(), str(conf), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return proc, port


async def test_sentinel_mode_reserves_on_the_master_the_sentinel_names(tmp_path: Path) -> None:
    master = RedisServer(tmp_path / "master")
    sentinel, sentinel_port = start_sentinel(tmp_path, master.port)
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/quotas"
    config = RedisConfig(mode="sentinel", url=url, timeout_ms=2000)
    store = open_store(config, url)
    assert isinstance(store.transport, PipeTransport)   # pipelined to the primary it names
    client = store.client
    try:
        deadline = time.monotonic() + 10
        while True:                                            # the sentinel needs a moment
            try:
                await client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline and sentinel.poll() is None
                await asyncio.sleep(0.1)
        engine = Engine(store.transport)
        p = tier_plan(sliding("requests_per_minute", "requests", "60s", 2), user="sentinel")
        results = [await engine.reserve(rq(p, 10, 10)) for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]
        # the state is on the master the sentinel named
        assert redis.Redis(port=master.port).exists("rl:{user:sentinel}") == 1
    finally:
        await store.aclose()
        sentinel.terminate()
        sentinel.wait(10)
        master.stop()
