"""Lines a client can make the daemon write are rate-limited: a flood of bad requests (a bearer
that is not UTF-8 on the admin API, requests that end in a 500) writes a bounded log, and
the answers stay the right ones."""

from __future__ import annotations

import http.client
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ratelimitd.http.edge import (
    CLIENT_LOG,
    api_handler,
    client_log,
    client_log_ctx,
)
from tests.support.daemon import Daemon, daemons, embedded_redis_pids, redis_pid, wait_healthy
from tests.support.redis_servers import free_port

__all__ = ["daemons", "embedded_redis_pids"]  # fixtures

FLOOD = 2000
ADMIN_TOKEN = "adm-token-0123456789abcdef"
# bytes that are not UTF-8, then some that are: aiohttp hands them over surrogate-escaped
BEARERS = (b"\xff\xfe", b"s3cr\xe9t-0123456789abcdef", ADMIN_TOKEN.encode() + b"\x80")


def config_text(port: int, data_dir: Path) -> str:
    return f'''
[server]
listen = ["127.0.0.1:{port}"]
admin_tokens = ["{ADMIN_TOKEN}"]
access_log = false

[redis]
data_dir = "{data_dir}"
'''


def flood(port: int, path: str, count: int, bearer: Iterator[bytes]) -> dict[int, int]:
    """`count` GETs of `path` on one keep-alive connection: how many answers of each status."""
    statuses: dict[int, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(count):
            conn.putrequest("GET", path)
            conn.putheader("Authorization", b"Bearer " + next(bearer))
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
    finally:
        conn.close()
    return statuses


def cycle(values: tuple[bytes, ...]) -> Iterator[bytes]:
    while True:
        yield from values


def test_a_flood_of_non_utf8_admin_bearers_gets_401s_and_a_bounded_log(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir))
    daemons.append(daemon)
    wait_healthy(daemon, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    before = len(daemon.log.splitlines())

    statuses = flood(port, "/v1/admin/keys/key_0123456789abcdefg", FLOOD, cycle(BEARERS))
    assert statuses == {401: FLOOD}
    assert daemon.stop() == 0
    written = daemon.log.splitlines()[before:]
    # start and stop lines only: a refused token is the client's mistake, not an error
    assert len(written) < 20, "\n".join(written[:40])
    assert "Traceback" not in daemon.log


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("a bug a client can reach")


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("tests.client_log")
    caught: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caught.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    yield caught
    logger.removeHandler(handler)


async def test_unhandled_errors_answer_500_with_a_bounded_number_of_tracebacks(
        records: list[logging.LogRecord]) -> None:
    app = web.Application()
    app[CLIENT_LOG] = client_log(logging.getLogger("tests.client_log"))
    app.cleanup_ctx.append(client_log_ctx)
    app.router.add_get("/boom", api_handler(_boom))
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                async with session.get(f"http://127.0.0.1:{server.port}/boom") as resp:
                    assert resp.status == 500
                    assert (await resp.json())["error"]["code"] == "internal_error"
    finally:
        await server.close()
    tracebacks = [r for r in records if r.exc_info]
    assert len(tracebacks) == 1
    assert "a bug a client can reach" in str(tracebacks[0].exc_info[1])  # type: ignore[index]
    # on stop, one line says how many were left out
    assert any(getattr(r, "suppressed", 0) == 299 for r in records)
