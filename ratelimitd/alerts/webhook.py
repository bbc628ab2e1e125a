"""One webhook's delivery (delivery.py's step 3): a worker reads the outbox through the URL's
consumer group, POSTs each alert signed, acknowledges it, and claims what a daemon that is
gone left unacknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from enum import Enum
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson

from ratelimitd.alerts.settings import LOG_EVERY_S, AlertStats
from ratelimitd.alerts.signing import SIGNATURE_HEADER, signature_header
from ratelimitd.errors import StoreReplyError, StoreUnavailable
from ratelimitd.ops.logs import ThrottledLog
from ratelimitd.quota.alert_record import AlertDecodeError, decode_alert
from ratelimitd.store.connect import RedisClient
from ratelimitd.store.failures import failure_name

if TYPE_CHECKING:
    from ratelimitd.alerts.delivery import AlertService

log = logging.getLogger("ratelimitd.alerts")

ALERT_ID_HEADER: Final = "X-Ratelimitd-Alert-Id"
USER_AGENT: Final = "ratelimitd-alerts/1"
# statuses that say "never send this again"; every other failure is retried
REJECTED_STATUSES: Final = frozenset({400, 410, 413, 422})
# Entries taken at a time: one, so the only entry a daemon holds is the one it is POSTing or
# retrying, which it keeps touching; more would sit untouched behind a retried one, and other
# daemons would claim them (no duplicate, checked, but churn). Alerts are rare; a backlog after
# an outage drains at one POST plus three Redis calls per alert, per daemon.
READ_BATCH: Final = 1
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


class _Outcome(Enum):
    DELIVERED = "delivered"
    REJECTED = "rejected"
    RETRY = "retry"


class WebhookWorker:
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
                                  failure_name(exc))
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
