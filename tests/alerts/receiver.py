"""A real webhook receiver for the tests: an aiohttp server on a free loopback port."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from tests.redis_servers import free_port


@dataclass(frozen=True)
class Received:
    body: bytes
    signature: str | None
    alert_id_header: str | None
    status: int                     # what the receiver answered


class Receiver:
    """Records every POST to /hook. Answers `status` (200 unless set), or 500 for the next
    `fail_next` requests. Not listening until start(): connections are refused."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self.status = 200
        self.fail_next = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=t0ps3cret"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.status
        if self.fail_next > 0:
            self.fail_next -= 1
            status = 500
        self.received.append(Received(body, request.headers.get("X-Ratelimitd-Signature"),
                                      request.headers.get("X-Ratelimitd-Alert-Id"), status))
        return web.Response(status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def accepted(self) -> collections.Counter[str]:
        """How many times each alert id was answered with a 2xx."""
        return collections.Counter(orjson.loads(r.body)["id"] for r in self.received
                                   if 200 <= r.status < 300)


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], what: str,
                     timeout_s: float = 15.0) -> None:
    """Polls `condition` until true; fails the test naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)
