"""Health, readiness, and an unavailable Redis."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

from ratelimitd.quota.library import Library
from tests.support.http import (
    UNKNOWN_RID,
    Serve,
    assert_error,
    call,
    limit_of,
    o200k,
    rq,
    small,
)
from tests.support.redis_servers import RedisServer, free_port, redis_binary

# -- health, readiness and an unavailable Redis ------------------------------------------------

async def test_healthz_and_readyz(serve: Serve, redis_client: Redis) -> None:
    client = await serve()
    resp, body = await call(client, "/healthz", method="GET")
    assert resp.status == 200 and body == {"status": "ok"}
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 200
    assert body == {"ready": True, "redis": "ok", "scripts": "loaded", "config": "<test>"}
    # a Redis that lost its functions (restart, FUNCTION FLUSH) gets them back from /readyz
    await redis_client.function_flush()
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 200 and body["ready"] is True
    assert await redis_client.function_list(library=Library.build().name)


async def test_redis_going_down_gives_503_and_readyz_says_so(serve: Serve, tmp_path: Any) -> None:
    own = RedisServer(tmp_path / "redis")
    try:
        client = await serve({**small(), "redis": {"timeout_ms": 200}}, url=own.url)
        resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, rsv
        resp, body = await call(client, "/readyz", method="GET")
        assert resp.status == 200 and body["ready"] is True
    finally:
        own.stop()
    started = time.monotonic()
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert_error(resp, body, 503, "backend_unavailable")
    assert resp.headers["Retry-After"] == "1"
    resp, body = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 1})
    assert_error(resp, body, 503, "backend_unavailable")
    resp, body = await call(client, "/v1/release", {"reservation_id": rsv["reservation_id"]})
    assert_error(resp, body, 503, "backend_unavailable")
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 503
    assert body["ready"] is False and "unavailable" in body["redis"]
    resp, body = await call(client, "/healthz", method="GET")       # the process is still up
    assert resp.status == 200 and body == {"status": "ok"}
    assert time.monotonic() - started < 5                            # failures come fast


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)


async def test_the_daemon_recovers_when_redis_comes_back_empty(serve: Serve,
                                                               tmp_path: Path) -> None:
    """A Redis restarted without its data or scripts: no daemon restart needed."""
    port = free_port()
    proc = start_redis(port, tmp_path / "a")
    try:
        client = await serve({**small(), "redis": {"timeout_ms": 200}},
                             url=f"redis://127.0.0.1:{port}/0")
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, body
    finally:
        proc.terminate()
        proc.wait(10)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert_error(resp, body, 503, "backend_unavailable")
    proc = start_redis(port, tmp_path / "b")
    try:
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))   # no library: reload
        assert resp.status == 200, body
        assert limit_of(body, "requests_per_minute")["remaining"] == 4        # an empty Redis
        resp, body = await call(client, "/readyz", method="GET")
        assert resp.status == 200 and body["ready"] is True
    finally:
        proc.terminate()
        proc.wait(10)


async def test_no_redis_answers_503_by_default(serve: Serve) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await serve({**small(), "redis": {"timeout_ms": 50}}, url=dead)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert_error(resp, body, 503, "backend_unavailable", "Redis")
    assert resp.headers["Retry-After"] == "1"
    resp, body = await call(client, "/readyz", method="GET")
    assert resp.status == 503 and body["ready"] is False


async def test_no_redis_with_on_error_allow_admits_degraded(serve: Serve) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await serve({**small(), "redis": {"timeout_ms": 50, "on_error": "allow"}},
                         url=dead)
    resp, body = await call(client, "/v1/reserve", rq(prompt="hello there",
                                                      max_output_tokens=50))
    assert resp.status == 200, body
    assert body["allowed"] is True and body["degraded"] is True
    assert body["reservation_id"] is None
    assert body["input_tokens"] == len(o200k().encode("hello there"))
    assert body["max_output_tokens"] == 50
    assert body["reserved"] == {"requests": 0, "tokens": 0, "cost_usd": 0.0}
    assert [w["code"] for w in body["warnings"]] == ["backend_unavailable"]
    # input is still checked first: a bad request is refused even when degraded
    resp, answer = await call(client, "/v1/reserve", rq(input_tokens=-5))
    assert_error(resp, answer, 400, "invalid_request", "input_tokens")
    # commit and release have no degraded form
    resp, answer = await call(client, "/v1/commit", {"reservation_id": UNKNOWN_RID,
                                                    "input_tokens": 1, "output_tokens": 1})
    assert_error(resp, answer, 503, "backend_unavailable")
