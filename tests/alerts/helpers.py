"""Test helpers: a real webhook receiver (aiohttp, free loopback port), alerts, settings."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ratelimitd.alerts import Alert
from ratelimitd.config import AlertsConfig
from ratelimitd.policy import Subject
from ratelimitd.units import usd_to_nano
from tests.support.redis_servers import free_port

SECRET = "whsec-0123456789abcdef"
DAY_MS = 86_400_000


def make_alerts(count: int, first: int = 0, created_ms: int | None = None) -> list[Alert]:
    """`count` distinct alerts: the 80 % threshold of a $10 daily budget, one user each."""
    now = int(time.time() * 1000) if created_ms is None else created_ms
    return [Alert.cost_threshold(Subject("user", f"u{i}"), "daily_budget_usd", 0.8,
                                 usd_to_nano(8.25), usd_to_nano(10), now - now % DAY_MS, now)
            for i in range(first, first + count)]


def alerts_config(*urls: str, **knobs: Any) -> AlertsConfig:
    """Webhooks signed with SECRET, retried at least once a second."""
    return AlertsConfig(webhooks=urls, webhook_secret=SECRET, retry_max_s=1, **knobs)


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
