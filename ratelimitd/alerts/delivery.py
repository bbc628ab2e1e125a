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
import hashlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from ratelimitd.alerts.signing import SIGNATURE_HEADER, signature_header
from ratelimitd.alerts.streams import Outbox
from ratelimitd.config import AlertsConfig, resolve_secret
from ratelimitd.errors import StoreReplyError, StoreUnavailable
from ratelimitd.ops.logs import ThrottledLog
from ratelimitd.quota.alert_record import Alert, AlertDecodeError, decode_alert
from ratelimitd.store.connect import RedisClient
from ratelimitd.store.failures import DRIVER_FAILURES, store_error

log = logging.getLogger("ratelimitd.alerts")
T = TypeVar("T")

ALERT_ID_HEADER: Final = "X-Ratelimitd-Alert-Id"
USER_AGENT: Final = "ratelimitd-alerts/1"
# statuses that say "never send this again"; every other failure is retried
REJECTED_STATUSES: Final = frozenset({400, 410, 413, 422})
# Entries taken at a time: one, so the only entry a daemon holds is the one it is POSTing or
# retrying, which it keeps touching; more would sit untouched behind a retried one, and other
# daemons would claim them (no duplicate, checked, but churn). Alerts are rare; a backlog after
# an outage drains at one POST plus three Redis calls per alert, per daemon.
READ_BATCH: Final = 1
LOG_EVERY_S: Final = 30.0
# a consumer without pending entries, silent this long, is a daemon that is gone
STALE_CONSUMER_MS: Final = 86_400_000


def webhook_group(url: str) -> str:
    """The consumer group of one webhook URL: its delivered marks."""
    return "wh-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def webhook_label(url: str) -> str:
    """How logs name a webhook: scheme://host:port and group, never its path or query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port} ({webhook_group(url)})"


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half the step for sure, half at random, so daemons
    that failed together do not retry together."""
    step = min(cap_s, base_s * 2.0 ** min(attempt - 1, 32))
    return step / 2 + rng.uniform(0, step / 2)


@dataclass(slots=True)
class AlertStats:
    """Counters of one AlertService (for logs and /metrics)."""

    submitted: int = 0          # alerts handed to submit()
    queue_full: int = 0         # dropped by submit(): the queue was full
    forwarded: int = 0          # appended to the outbox
    duplicates: int = 0         # forwarded before (a repeated commit): not appended again
    forward_errors: int = 0     # outbox appends that failed (Redis away), retried
    lost_on_shutdown: int = 0   # still queued when aclose() gave up on Redis
    delivered: int = 0          # POSTs answered 2xx
    failed_attempts: int = 0    # POSTs that failed and will be retried
    rejected: int = 0           # POSTs refused for good (400, 410, 413, 422)
    expired: int = 0            # older than delivery_max_age_s before delivered
    handed_over: int = 0        # claimed by another daemon while this one retried
    trimmed: int = 0            # pending entries the stream cap removed before delivery
    malformed: int = 0          # outbox entries that are not alerts
    redis_errors: int = 0       # delivery-side Redis calls that failed
    internal_errors: int = 0    # anything else that went wrong (a bug): logged, carried on


class _Outcome(Enum):
    DELIVERED = "delivered"
    REJECTED = "rejected"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """The knobs of delivery; from AlertsConfig, plus the timings tests shorten."""

    secret: bytes
    timeout_s: float
    retry_base_s: float
    retry_max_s: float
    max_age_ms: int
    claim_idle_ms: int
    poll_interval_s: float
    redis_timeout_s: float


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
        self._workers = [_WebhookWorker(url, self, redis) for url in config.webhooks]
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
                                          _failure_name(exc))
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


class _WebhookWorker:
    """Delivers the outbox to one webhook URL, through its consumer group."""

    def __init__(self, url: str, service: AlertService, redis: RedisClient) -> None:
        self.url = url
        self.group = webhook_group(url)
        self.label = webhook_label(url)
        self.wake = asyncio.Event()
        self._service = service
        self._redis = redis
        self._key = service.outbox.key
        self._group_ready = False
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._log = ThrottledLog(log, per_window=1, window_s=LOG_EVERY_S)

    @property
    def _stats(self) -> AlertStats:
        return self._service.stats

    async def run(self) -> None:
        errors = 0
        while not self._service.stopping.is_set():
            try:
                await self._ensure_group()
                entries = await self._claim_stale() or await self._read_new()
                errors = 0
                if not entries:
                    await self._idle(self._service.settings.poll_interval_s)
                    continue
                await self._deliver_batch(entries)
            except StoreUnavailable as exc:
                if isinstance(exc, StoreReplyError) and "NOGROUP" in str(exc):
                    self._group_ready = False  # the stream was deleted: make it again
                self._stats.redis_errors += 1
                errors += 1
                self._log.warning("webhook_redis_error",
                                  "webhook %s: Redis call failed, retrying: %s", self.label,
                                  _failure_name(exc))
                await self._idle(self._service.backoff_s(errors))
            except Exception:  # a bug must not end delivery for good
                self._stats.internal_errors += 1
                errors += 1
                log.exception("webhook %s: delivery failed; carrying on", self.label)
                await self._idle(self._service.backoff_s(errors))

    async def _deliver_batch(self, entries: list[tuple[Any, Any]]) -> None:
        """Delivers entries in order. Those that waited behind a retried one may have been
        claimed by another daemon meanwhile: they are checked (and kept) before their turn."""
        taken = time.monotonic()
        touch_after = self._service.settings.claim_idle_ms / 3000
        for entry_id, fields in entries:
            if self._service.stopping.is_set():
                return
            if time.monotonic() - taken > touch_after and not await self._still_mine(entry_id):
                continue
            await self._deliver(entry_id, fields)

    async def _idle(self, seconds: float) -> None:
        """Sleeps until woken (an alert forwarded here), stopped, or `seconds` pass."""
        waits = [asyncio.ensure_future(self.wake.wait()),
                 asyncio.ensure_future(self._service.stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        self.wake.clear()

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # from the oldest entry: alerts forwarded before this group existed are delivered
            await self._service.bounded(
                self._redis.xgroup_create(self._key, self.group, id="0", mkstream=True))
        except StoreReplyError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True
        await self._forget_gone_consumers()

    async def _forget_gone_consumers(self) -> None:
        """Each daemon start adds a consumer; those of daemons long gone are dropped."""
        bounded = self._service.bounded
        for consumer in await bounded(self._redis.xinfo_consumers(self._key, self.group)):
            if int(consumer["pending"]) == 0 and int(consumer["idle"]) > STALE_CONSUMER_MS:
                await bounded(self._redis.xgroup_delconsumer(self._key, self.group,
                                                             consumer["name"]))

    async def _claim_stale(self) -> list[tuple[Any, Any]]:
        """Entries another consumer read and left unacknowledged for claim_idle_ms."""
        now = time.monotonic()
        if now < self._next_claim:
            return []
        claim_idle_ms = self._service.settings.claim_idle_ms
        reply = await self._service.bounded(self._redis.xautoclaim(
            self._key, self.group, self._service.consumer, claim_idle_ms, self._claim_cursor,
            count=READ_BATCH))
        cursor, entries = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":  # a full pass done: the next one in a while
            self._next_claim = now + claim_idle_ms / 2000
        if deleted:
            self._stats.trimmed += len(deleted)
            log.warning("webhook %s: %d pending alerts were trimmed from the outbox before "
                        "delivery (raise [alerts] stream_max_len)", self.label, len(deleted))
        return [(entry_id, fields) for entry_id, fields in entries if fields]

    async def _read_new(self) -> list[tuple[Any, Any]]:
        reply = await self._service.bounded(self._redis.xreadgroup(
            self.group, self._service.consumer, {self._key: ">"}, count=READ_BATCH))
        if not reply:
            return []
        streams = reply.values() if isinstance(reply, dict) else (s[1] for s in reply)
        return [entry for stream in streams for entry in _entries(stream)]

    async def _deliver(self, entry_id: Any, fields: Any) -> None:
        try:
            alert = decode_alert(fields)
        except AlertDecodeError as exc:
            self._stats.malformed += 1
            log.warning("webhook %s: outbox entry %s is not an alert (%s); skipped", self.label,
                        _text(entry_id), exc)
            await self._ack(entry_id)
            return
        body = orjson.dumps(alert.to_json())
        attempt = 0
        while True:
            if self._service.now_ms() - alert.created_ms > self._service.settings.max_age_ms:
                self._stats.expired += 1
                log.warning("webhook %s: alert %s dropped undelivered after %d attempts: older "
                            "than [alerts] delivery_max_age_s", self.label, alert.id, attempt)
                await self._ack(entry_id)
                return
            outcome = await self._post(body, alert.id)
            if outcome is _Outcome.DELIVERED:
                self._stats.delivered += 1
                await self._ack(entry_id)
                return
            if outcome is _Outcome.REJECTED:
                self._stats.rejected += 1
                await self._ack(entry_id)
                return
            self._stats.failed_attempts += 1
            attempt += 1
            if not await self._wait_holding(entry_id, self._service.backoff_s(attempt)):
                return

    async def _post(self, body: bytes, alert_id: str) -> _Outcome:
        settings = self._service.settings
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   ALERT_ID_HEADER: alert_id,
                   SIGNATURE_HEADER: signature_header(settings.secret, self._service.unix_s(),
                                                      body)}
        try:
            async with self._service.session().post(
                    self.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=settings.timeout_s)) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._log.warning("webhook_unreachable", "webhook %s unreachable, retrying: %s",
                              self.label, type(exc).__name__)
            return _Outcome.RETRY
        if 200 <= status < 300:
            return _Outcome.DELIVERED
        if status in REJECTED_STATUSES:
            log.warning("webhook %s refused alert %s with HTTP %d; not sent again", self.label,
                        alert_id, status)
            return _Outcome.REJECTED
        self._log.warning("webhook_status", "webhook %s answered HTTP %d, retrying", self.label,
                          status)
        return _Outcome.RETRY

    async def _wait_holding(self, entry_id: Any, seconds: float) -> bool:
        """Waits `seconds` before the next attempt, touching the entry often enough that no
        other daemon claims it; False when stopping or when it was claimed anyway."""
        touch_every = self._service.settings.claim_idle_ms / 3000
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return await self._still_mine(entry_id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, touch_every)):
                    await self._service.stopping.wait()
            if self._service.stopping.is_set() or not await self._still_mine(entry_id):
                return False

    async def _still_mine(self, entry_id: Any) -> bool:
        """True when this consumer still owns the entry; resets its idle time if so."""
        consumer = self._service.consumer
        pending = await self._service.bounded(self._redis.xpending_range(
            self._key, self.group, entry_id, entry_id, 1, consumername=consumer))
        if not pending:
            self._stats.handed_over += 1
            return False
        await self._service.bounded(
            self._redis.xclaim(self._key, self.group, consumer, 0, [entry_id], justid=True))
        return True

    async def _ack(self, entry_id: Any) -> None:
        await self._service.bounded(self._redis.xack(self._key, self.group, entry_id))


def _entries(stream: Any) -> list[tuple[Any, Any]]:
    return [(entry_id, fields) for entry_id, fields in stream if fields]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _failure_name(exc: StoreUnavailable) -> str:
    """The name of the failure under `exc` (ConnectionError, TimeoutError...), for the logs."""
    return type(exc.__cause__ if exc.__cause__ is not None else exc).__name__
