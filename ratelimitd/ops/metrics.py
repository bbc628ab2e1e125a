"""Prometheus metrics: cheap to record, one coherent view across `--workers N` processes.

Why not prometheus-client's multiprocess mode: it writes every increment to a memory-mapped
file under a lock, which costs a reserve more than its metrics may (docs/performance.md has the
figures). Here, a sample is a float in a list, a pre-resolved child is an index into it, and
each worker writes its whole list to its own file in the daemon's metrics directory once a
second (`run_flusher`), atomically (write, then rename). `/metrics`, whichever worker answers
it, sums the files of the other workers with its own live values and renders them in the
Prometheus text format through prometheus-client. A scrape therefore sees other workers' counts
up to one second late, and a worker killed by SIGKILL loses at most its last second.

The supervisor makes the directory before forking (`MetricsDirectory.create()`), calls
`mark_dead(pid)` for a worker that exits (its totals stay in the sum; it no longer counts as
up) and removes the directory on exit. Without a directory the metrics are this process's own.

Labels are bounded by construction: a tier, model or limit name is kept only when the
configuration names it, an error code or route only when it is in a fixed list; anything else
is "other". No label ever carries a user, key, ip, reservation or other caller-chosen value.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ratelimitd.errors import ERROR_CODES
from ratelimitd.ops.metric_catalogue import (
    ALERT_LABELS,
    BLOCK_CAUSES,
    BLOCK_SCOPES,
    DECISION_RESULTS,
    FAMILIES,
    NANO_PER_USD,
    OTHER,
    REDIS_CALLS,
    REDIS_ERRORS,
    ROUTES,
    SETTLE_CALLS,
    STATUS_CODES,
    bounded,
)
from ratelimitd.ops.metric_samples import Counter, Histogram, Samples
from ratelimitd.ops.metric_sharing import render, write_samples

log = logging.getLogger("ratelimitd.metrics")

FLUSH_INTERVAL_S: Final = 1.0
# Hot-path calls remembered by their raw labels (callers name tiers and models: bounded)
CALLS_KEPT: Final = 4096


@dataclass(frozen=True, slots=True)
class RouteMetrics:
    """One route's pre-resolved children, made when the route is registered."""

    latency: Histogram
    codes: dict[str, Counter]

    def observe(self, status: int, seconds: float) -> None:
        self.latency.observe(seconds)
        code = str(status)
        (self.codes.get(code) or self.codes[OTHER]).inc()


@dataclass(frozen=True, slots=True)
class RedisCallMetrics:
    latency: Histogram
    errors: dict[str, Counter]

    def observe(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def error(self, exc: BaseException) -> None:
        (self.errors.get(type(exc).__name__) or self.errors[OTHER]).inc()


class Metrics:
    """One process's metrics. Build it in each worker (after the fork), with what the
    configuration names: tiers, models (priced ones), limit names, attribute scopes, shadow
    limits."""

    def __init__(self, tiers: Iterable[str], models: Iterable[str], limit_names: Iterable[str],
                 attribute_scopes: Iterable[str] = (), directory: Path | None = None,
                 shadow_limits: Iterable[str] = ()) -> None:
        self.directory = directory
        self._samples = Samples()
        self._children: dict[tuple[str, tuple[str, ...]], Counter] = {}
        # a hot-path call's children by the raw labels it was given: one lookup instead of
        # bounding and resolving each label again
        self._by_call: dict[tuple[str | None, ...], tuple[Counter, ...]] = {}
        self._flush_warned = False
        self.tiers = self.models = self.reasons = self.block_scopes = frozenset[str]()
        self.shadow_limits = frozenset[str]()
        self.reconfigure(tiers, models, limit_names, attribute_scopes, shadow_limits)

    def reconfigure(self, tiers: Iterable[str], models: Iterable[str],
                    limit_names: Iterable[str], attribute_scopes: Iterable[str] = (),
                    shadow_limits: Iterable[str] = ()) -> None:
        """The label values the configuration allows; called again on reload (SIGHUP): the
        totals live on, each set is swapped whole."""
        self.tiers = frozenset(tiers)
        self.models = frozenset(models)
        self.reasons = frozenset(limit_names).union(ERROR_CODES)
        self.block_scopes = BLOCK_SCOPES | frozenset(attribute_scopes)
        self.shadow_limits = frozenset(shadow_limits)
        self._by_call = {}
        self._precreate()

    def _precreate(self) -> None:
        """The configured combinations at zero: every family is in the first scrape, and
        rate() has a starting point."""
        for event in ("committed", "released", "expired"):
            self._counter("ratelimitd_reservations", (event,))
        for tier in self.tiers:
            self._counter("ratelimitd_decisions", ("allowed", "none", tier))
            for model in self.models:
                for stage in ("reserved", "committed"):
                    self._counter("ratelimitd_tokens", (stage, tier, model))
                    self._counter("ratelimitd_cost_usd", (stage, tier, model))
                self._counter("ratelimitd_overruns", (tier, model))
                self._counter("ratelimitd_overrun_tokens", (tier, model))
        for labels in ALERT_LABELS:
            self._counter("ratelimitd_alerts", labels)
        for settle in SETTLE_CALLS:
            self._counter("ratelimitd_unreplicated_settles", (settle,))
        for scope in self.block_scopes:
            for cause in BLOCK_CAUSES:
                self._counter("ratelimitd_blocks", (scope, cause))
        for limit in self.shadow_limits:
            self._counter("ratelimitd_shadow_over", (limit,))

    def _counter(self, family: str, labels: tuple[str, ...]) -> Counter:
        key = (family, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._samples.counter(FAMILIES[family], labels)
        return child

    # -- children resolved once, at registration -------------------------------------------

    def route(self, route: str) -> RouteMetrics:
        name = bounded(route, ROUTES)
        family = FAMILIES["ratelimitd_http_request_duration_seconds"]
        codes = {code: self._counter("ratelimitd_http_responses", (name, code))
                 for code in (*STATUS_CODES, OTHER)}
        return RouteMetrics(self._samples.histogram(family, (name,)), codes)

    def redis_call(self, call: str) -> RedisCallMetrics:
        name = bounded(call, REDIS_CALLS)
        family = FAMILIES["ratelimitd_redis_call_duration_seconds"]
        errors = {error: self._counter("ratelimitd_redis_errors", (name, error))
                  for error in (*REDIS_ERRORS, OTHER)}
        return RedisCallMetrics(self._samples.histogram(family, (name,)), errors)

    # -- hot path --------------------------------------------------------------------------

    def _remember(self, call: tuple[str | None, ...], children: tuple[Counter, ...]
                  ) -> tuple[Counter, ...]:
        if len(self._by_call) >= CALLS_KEPT:
            self._by_call.clear()
        self._by_call[call] = children
        return children

    def decision(self, result: str, reason: str | None, tier: str | None) -> None:
        """One reserve's outcome: result allowed/denied/invalid/…, reason the denying limit's
        name or the error code (None when allowed)."""
        call = ("decision", result, reason, tier)
        children = self._by_call.get(call)
        if children is None:
            children = self._remember(call, (self._counter("ratelimitd_decisions", (
                bounded(result, DECISION_RESULTS),
                "none" if reason is None else bounded(reason, self.reasons),
                bounded(tier, self.tiers))),))
        children[0].inc()

    def reserved(self, tier: str | None, model: str | None, tokens: int, cost_nano: int) -> None:
        call = ("reserved", tier, model)
        children = self._by_call.get(call)
        if children is None:
            labels = ("reserved", bounded(tier, self.tiers), bounded(model, self.models))
            children = self._remember(call, (self._counter("ratelimitd_tokens", labels),
                                             self._counter("ratelimitd_cost_usd", labels)))
        children[0].inc(tokens)
        children[1].inc(cost_nano / NANO_PER_USD)

    def committed(self, tier: str | None, model: str | None, tokens: int, cost_nano: int,
                  overrun_tokens: int = 0) -> None:
        """A first commit (not a duplicate): its actual usage, and its overrun if any."""
        call = ("committed", tier, model)
        children = self._by_call.get(call)
        if children is None:
            t, m = bounded(tier, self.tiers), bounded(model, self.models)
            children = self._remember(call, (
                self._counter("ratelimitd_reservations", ("committed",)),
                self._counter("ratelimitd_tokens", ("committed", t, m)),
                self._counter("ratelimitd_cost_usd", ("committed", t, m))))
        children[0].inc()
        children[1].inc(tokens)
        children[2].inc(cost_nano / NANO_PER_USD)
        if overrun_tokens > 0:
            t, m = bounded(tier, self.tiers), bounded(model, self.models)
            self._counter("ratelimitd_overruns", (t, m)).inc()
            self._counter("ratelimitd_overrun_tokens", (t, m)).inc(overrun_tokens)

    def released(self) -> None:
        self._counter("ratelimitd_reservations", ("released",)).inc()

    def expired(self) -> None:
        self._counter("ratelimitd_reservations", ("expired",)).inc()

    def unreplicated(self, call: str) -> None:
        """A commit or release applied that the replicas did not acknowledge in time."""
        self._counter("ratelimitd_unreplicated_settles", (call,)).inc()

    def alert(self, kind: str, severity: str) -> None:
        labels = (kind, severity) if (kind, severity) in ALERT_LABELS else (OTHER, OTHER)
        self._counter("ratelimitd_alerts", labels).inc()

    def shadow_over(self, limit: str) -> str:
        """A shadow limit that would have denied; returns its label (the name, or "other")."""
        label = bounded(limit, self.shadow_limits)
        self._counter("ratelimitd_shadow_over", (label,)).inc()
        return label

    def block(self, scope: str, cause: str) -> None:
        labels = (bounded(scope, self.block_scopes), bounded(cause, BLOCK_CAUSES))
        self._counter("ratelimitd_blocks", labels).inc()
    # -- sharing and rendering -------------------------------------------------------------

    def flush(self) -> None:
        """Writes this process's values to its file in the metrics directory, if any."""
        if self.directory is None:
            return
        if os.getpid() != self._samples.pid:
            raise RuntimeError("Metrics were built before a fork; build them in each worker")
        try:
            write_samples(self.directory, self._samples)
        except OSError as exc:  # a full disk or a removed directory must not stop serving
            if not self._flush_warned:
                log.warning("cannot write metrics to %s: %s", self.directory, exc)
                self._flush_warned = True

    async def run_flusher(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flushes every interval_s until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                self.flush()
        finally:
            self.flush()

    def render(self) -> bytes:
        """The /metrics body: this process's live values plus every other worker's last flush."""
        return render(self.directory, self._samples)

