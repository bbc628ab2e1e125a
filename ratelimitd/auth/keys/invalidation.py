"""Key invalidations: a revoked or rotated key's id, published on INVALIDATE_CHANNEL, drops
it from every daemon's resolve cache (cache.py). A daemon not subscribed (Redis away) clears
its cache when it subscribes again, since it may have missed messages; entries expire within
the cache's ttl anyway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from ratelimitd.auth.keys.cache import ResolveCache
from ratelimitd.store.connect import RedisClient, is_cluster
from ratelimitd.store.failures import DRIVER_FAILURES

log = logging.getLogger("ratelimitd.auth.keys.store")  # the key store's log

INVALIDATE_CHANNEL: Final = "ratelimitd:keys:invalidate"


class Invalidations:
    """Listens for the invalidations of every daemon (`start`, `aclose`) and publishes this
    one's (`publish`); `subscribed` is set while the subscription holds."""

    def __init__(self, redis: RedisClient, cache: ResolveCache[Any]) -> None:
        self._redis = redis
        self.cache = cache
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        """Listens for revocations and rotations published by any daemon; returns once
        subscribed (or keeps trying in the background if Redis is down)."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="keys-invalidations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), 2.0)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def _listen(self) -> None:
        backoff = 0.05
        while True:
            try:
                if is_cluster(self._redis):
                    # its pub/sub picks a node from the slot map, which the first call loads
                    await self._redis.initialize()
            except DRIVER_FAILURES as exc:
                log.warning("key invalidations: cannot reach the cluster (%s)",
                            type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(INVALIDATE_CHANNEL)
                # messages may have been missed while not subscribed
                self.cache.clear()
                self.subscribed.set()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self.cache.invalidate(data.decode() if isinstance(data, bytes)
                                              else str(data))
            except DRIVER_FAILURES as exc:
                self.subscribed.clear()
                log.warning("key invalidations: lost the subscription (%s); entries still "
                            "expire within %.1f s", type(exc).__name__, self.cache.ttl_s)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                with contextlib.suppress(*DRIVER_FAILURES):
                    await pubsub.aclose()

    async def publish(self, key_id: str) -> None:
        """Drops `key_id` from this cache, and tells every other daemon to."""
        self.cache.invalidate(key_id)
        try:
            await self._redis.publish(INVALIDATE_CHANNEL, key_id)
        except DRIVER_FAILURES as exc:
            # the change is stored; other daemons' entries still expire within the cache ttl
            log.warning("key %s: could not publish the invalidation (%s)", key_id,
                        type(exc).__name__)
