"""Webhook delivery: alerts from script replies to the outbox stream, and on to every webhook.

`AlertService` is what a daemon runs (start at startup, aclose at shutdown):

1. `submit(alerts)`, called by a handler with the alerts a script reply carried, puts them in a
   bounded in-memory queue and returns at once: it never waits, never raises, so it can neither
   delay nor fail a decision. A full queue drops the alert from webhook delivery (counted in
   `stats.queue_full`, logged); it stays in its subject's list and the usage API.
2. A forwarder task appends each queued alert to the outbox stream (`Outbox.forward`,
   idempotent by alert id), retrying with backoff while Redis is away.
3. Per webhook URL, a worker task reads the outbox through that URL's consumer group
   (`webhook_group(url)`, a hash of the URL: each URL has its own delivered marks) and POSTs
   each alert, signed (signing.py), one at a time in stream order. A 2xx acknowledges it
   (XACK); 400, 410, 413 and 422 mean the receiver refuses it for good: acknowledged, counted as
   rejected; anything else (connection refused, timeout, 3xx, 5xx, 429...) is retried with
   exponential backoff and full jitter, capped at `retry_max_s`, until the alert is
   `delivery_max_age_s` old (then dropped, counted as expired). A receiver that stays down
   costs one POST per backoff step and the stream entries it has not acknowledged, nothing more.

Several daemons share delivery: a consumer group hands each new entry to one consumer (one
daemon), so each alert reaches each webhook once in the normal case. An entry a daemon read but
never acknowledged (it died mid-delivery) is claimed by another after `claim_idle_ms` without
news (XAUTOCLAIM); a daemon retrying an entry keeps it by touching it (XCLAIM) more often than
that (`claim_idle_ms` is at least twice the POST timeout, since a POST in progress is not
touched). After a crash an alert may be POSTed twice (at least once): receivers dedupe on its `id`
(also sent as the `X-Ratelimitd-Alert-Id` header). A new webhook's group starts at the oldest
retained entry, so it gets the outbox's alerts younger than `delivery_max_age_s`.
The secret and webhook URLs (which may carry tokens) are never logged; logs name a webhook by
scheme, host and port, and its group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TypeVar

import aiohttp

from ratelimitd.alerts.settings import LOG_EVERY_S, AlertStats, DeliverySettings, backoff_s
from ratelimitd.alerts.streams import Outbox
from ratelimitd.alerts.webhook import WebhookWorker
from ratelimitd.config import AlertsConfig, resolve_secret
from ratelimitd.errors import StoreUnavailable
from ratelimitd.ops.logs import ThrottledLog
from ratelimitd.quota.alert_record import Alert
from ratelimitd.store.connect import RedisClient
from ratelimitd.store.failures import DRIVER_FAILURES, failure_name, store_error

log = logging.getLogger("ratelimitd.alerts")
T = TypeVar("T")


class AlertService:
    """Forwards submitted alerts to the outbox and delivers the outbox to every webhook."""

    def __init__(self, redis: RedisClient, config: AlertsConfig, *,
                 session: aiohttp.ClientSession | None = None, consumer: str | None = None,
                 claim_idle_ms: int = 60_000, poll_interval_s: float = 0.5,
                 retry_base_s: float = 0.5, redis_timeout_s: float = 1.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.stats = AlertStats()
        self.outbox = Outbox(redis, config.stream_max_len)
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(config.queue_size)
        self._settings = DeliverySettings(
            secret=resolve_secret(config.webhook_secret).encode("utf-8", "surrogateescape")
            if config.webhooks else b"",
            timeout_s=config.webhook_timeout_ms / 1000, retry_base_s=retry_base_s,
            retry_max_s=float(config.retry_max_s), max_age_ms=config.delivery_max_age_s * 1000,
            # a POST in progress is not touched: no other daemon may claim it meanwhile
            claim_idle_ms=max(claim_idle_ms, 2 * config.webhook_timeout_ms),
            poll_interval_s=poll_interval_s, redis_timeout_s=redis_timeout_s)
        self._session = session
        self._own_session = session is None
        self._wall_clock = wall_clock
        self._stopping = asyncio.Event()
        self._rng = random.SystemRandom()
        self._workers = [WebhookWorker(url, self, redis) for url in config.webhooks]
        self._forwarder: asyncio.Task[None] | None = None
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._in_flight: Alert | None = None
        self._queue_log = ThrottledLog(log, per_window=1, window_s=LOG_EVERY_S)
        self._forward_log = ThrottledLog(log, per_window=1, window_s=LOG_EVERY_S)

    # -- the handlers' side ----------------------------------------------------------------------

    def submit(self, alerts: Iterable[Alert]) -> None:
        """Queues alerts for the outbox; returns at once, never raises. With no webhook
        configured nothing would read the outbox: they stay in their subjects' lists only."""
        for alert in alerts:
            self.stats.submitted += 1
            if not self._workers:
                continue
            try:
                self._queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.stats.queue_full += 1
                self._queue_log.warning("alert_queue_full", "alert queue full (%d): alert %s not "
                                        "sent to webhooks (it stays in the subject's alerts)",
                                        self._queue.maxsize, alert.id)

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._forwarder is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._forwarder = asyncio.create_task(self._forward_loop(), name="alerts-forwarder")
        self._worker_tasks = [asyncio.create_task(w.run(), name=f"alerts-{w.group}")
                              for w in self._workers]

    async def aclose(self, flush_timeout_s: float = 2.0) -> None:
        """Stops delivery (what was read and not acknowledged is claimed later, by this daemon
        restarted or another) and flushes the queue to the outbox for up to flush_timeout_s."""
        self._stopping.set()
        for task in self._worker_tasks:
            task.cancel()
        await asyncio.gather(*self._worker_tasks, return_exceptions=True)
        if self._forwarder is None and not self._queue.empty():
            self._forwarder = asyncio.create_task(self._forward_loop(), name="alerts-flush")
        if self._forwarder is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_timeout_s):
                    await self._queue.join()
            self._forwarder.cancel()
            await asyncio.gather(self._forwarder, return_exceptions=True)
        lost = self._queue.qsize() + (self._in_flight is not None)
        if lost:
            self.stats.lost_on_shutdown += lost
            log.warning("shutting down with %d alerts not forwarded to the outbox (Redis away); "
                        "they stay in their subjects' alerts", lost)
        if self._own_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> AlertService:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- forwarding ------------------------------------------------------------------------------

    async def _forward_loop(self) -> None:
        while True:
            alert = await self._queue.get()
            self._in_flight = alert  # still set if cancelled mid-way: aclose counts it lost
            try:
                await self._forward(alert)
                self._in_flight = None
            finally:
                self._queue.task_done()

    async def _forward(self, alert: Alert) -> None:
        attempt = 0
        while True:
            try:
                appended = await self.bounded(self.outbox.forward(alert))
                break
            except StoreUnavailable as exc:
                self.stats.forward_errors += 1
                self._forward_log.warning("outbox_unavailable",
                                          "cannot append alerts to the outbox, retrying: %s",
                                          failure_name(exc))
            except Exception:
                self.stats.internal_errors += 1
                log.exception("forwarding alert %s to the outbox failed; retrying", alert.id)
            attempt += 1
            await asyncio.sleep(self.backoff_s(attempt))
        if appended:
            self.stats.forwarded += 1
            for worker in self._workers:  # this daemon's workers need not wait for their poll
                worker.wake.set()
        else:
            self.stats.duplicates += 1

    # -- what the workers share ------------------------------------------------------------------

    @property
    def settings(self) -> DeliverySettings:
        return self._settings

    @property
    def stopping(self) -> asyncio.Event:
        return self._stopping

    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() opens the session"
        return self._session

    def now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def unix_s(self) -> int:
        return int(self._wall_clock())

    async def bounded(self, call: Awaitable[T]) -> T:
        """A Redis call, failed as StoreUnavailable when Redis fails it or it takes longer
        than redis_timeout_s."""
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                return await call
        except DRIVER_FAILURES as exc:  # TimeoutError is one
            raise store_error(exc) from exc

    def backoff_s(self, attempt: int) -> float:
        return backoff_s(attempt, self._settings.retry_base_s, self._settings.retry_max_s,
                         self._rng)
