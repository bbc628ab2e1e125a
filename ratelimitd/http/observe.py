"""The daemon's metrics, wired: the per-process `Metrics` on the app, its flusher, `GET
/metrics`, and what the decision handlers record (ops/metrics.py says how it is shared
across workers and why its labels are bounded).

`/metrics` needs no token, like /healthz: it carries counts by tier, model and route, never
a user, key or ip, and a scraper on the host reaches it without a secret in its config.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from ratelimitd.config import Config
from ratelimitd.errors import ApiError
from ratelimitd.ops.metrics import CONTENT_TYPE, Metrics, RedisCallMetrics


@dataclass(frozen=True, slots=True)
class RedisCalls:
    """The engine calls' latency and error children, resolved once per process."""

    reserve: RedisCallMetrics
    commit: RedisCallMetrics
    release: RedisCallMetrics

    @classmethod
    def of(cls, metrics: Metrics) -> RedisCalls:
        return cls(metrics.redis_call("reserve"), metrics.redis_call("commit"),
                   metrics.redis_call("release"))


METRICS: Final = web.AppKey("metrics", Metrics)
REDIS_CALLS: Final = web.AppKey("redis_calls", RedisCalls)


def build_metrics(config: Config, directory: Path | None) -> Metrics:
    """Built in the serving process (after any fork), labels from what the config names."""
    limit_names = {lim.name for tier in config.tiers.values() for lim in tier.limits}
    return Metrics(config.tiers, config.pricing.models, limit_names, directory=directory)


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """With workers (a shared directory), writes this worker's samples once a second."""
    metrics = app[METRICS]
    flusher = (asyncio.create_task(metrics.run_flusher()) if metrics.directory is not None
               else None)
    yield
    if flusher is not None:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": CONTENT_TYPE})


def store_failed(call: RedisCallMetrics, exc: BaseException) -> None:
    """A failed engine call, by the Redis error under our StoreUnavailable."""
    call.error(exc.__cause__ if exc.__cause__ is not None else exc)


def refused(metrics: Metrics, err: ApiError, tier: str | None) -> None:
    """A reserve that ended in an error answer: its result by status, its code as reason."""
    if err.code == "blocked":
        result = "blocked"
    elif err.status in (401, 403):
        result = "unauthenticated"
    elif err.status == 503:
        result = "error"
    else:
        result = "invalid"
    metrics.decision(result, err.code, tier)
