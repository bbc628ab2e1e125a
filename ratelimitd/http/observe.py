"""The daemon's metrics, wired: the per-process `Metrics` on the app, its flusher, `GET
/metrics`, and what the decision handlers record (ops/metrics.py says how it is shared
across workers and why its labels are bounded).

`/metrics` needs no token, like /healthz: it carries counts by tier, model and route, never
a user, key or ip, and a scraper on the host reaches it without a secret in its config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from ratelimitd.config import Config
from ratelimitd.errors import ApiError
from ratelimitd.ops.logs import ThrottledLog
from ratelimitd.ops.metric_sharing import CONTENT_TYPE
from ratelimitd.ops.metrics import Metrics, RedisCallMetrics
from ratelimitd.quota.model import ReserveResult

# A shadow limit over is told in the log once per limit in this window; the rest are counted
SHADOW_LOG_WINDOW_S: Final = 60.0


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


class ShadowReport:
    """Shadow limits that would have denied (they never deny), from the HTTP API and Envoy's
    gRPC service: counted per limit (`ratelimitd_shadow_over`) and told in the log, one
    line per limit a window, the lines past it counted in a summary line (a flood of them
    cannot flood the log)."""

    def __init__(self, metrics: Metrics, logger: logging.Logger) -> None:
        self.metrics = metrics
        self.log = ThrottledLog(logger, per_window=1, window_s=SHADOW_LOG_WINDOW_S)

    def over(self, limit: str, api: str, **fields: Any) -> None:
        """`limit`: a tier limit's name or an Envoy rule's path; `api`: http or grpc."""
        label = self.metrics.shadow_over(limit)
        self.log.log(logging.INFO, f"shadow_over {label}",
                     "shadow limit %s would have denied (%s)", label, api,
                     event="shadow_over", limit=label, api=api, **fields)

    def reserve(self, result: ReserveResult) -> None:
        """A reserve's shadow limits that it left over (its retries' answers are not new)."""
        if result.duplicate:
            return
        for state in result.states:
            if state.over and state.limit.shadow:
                self.over(state.limit.name, "http")


METRICS: Final = web.AppKey("metrics", Metrics)
REDIS_CALLS: Final = web.AppKey("redis_calls", RedisCalls)
SHADOW_REPORT: Final = web.AppKey("shadow_report", ShadowReport)


def shadow_limit_names(config: Config) -> set[str]:
    """The limits that never deny: tier limits and Envoy rules in shadow mode (every one of
    them under [server] shadow_mode)."""
    names = {lim.name for tier in config.tiers.values() for lim in tier.limits if lim.shadow}
    return names | {rule.path for rule in config.envoy_rules.rules()
                    if rule.limit is not None and (rule.shadow or config.server.shadow_mode)}


def build_metrics(config: Config, directory: Path | None) -> Metrics:
    """Built in the serving process (after any fork), labels from what the config names."""
    limit_names = {lim.name for tier in config.tiers.values() for lim in tier.limits}
    return Metrics(config.tiers, config.pricing.models, limit_names, directory=directory,
                   shadow_limits=shadow_limit_names(config))


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


async def shadow_report_ctx(app: web.Application) -> AsyncIterator[None]:
    """The shadow log's summaries, even when its limits go quiet."""
    summaries = asyncio.create_task(app[SHADOW_REPORT].log.run())
    yield
    summaries.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await summaries


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
