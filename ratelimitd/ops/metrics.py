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
import bisect
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ratelimitd.errors import ERROR_CODES
from ratelimitd.quota.alert_record import SEVERITIES

log = logging.getLogger("ratelimitd.metrics")

OTHER: Final = "other"
CONTENT_TYPE: Final = prometheus_client.CONTENT_TYPE_LATEST
FLUSH_INTERVAL_S: Final = 1.0

# The routes the daemon serves; any other path (404s, scans) is counted as "other".
ROUTES: Final = frozenset({
    "/v1/reserve", "/v1/commit", "/v1/release", "/healthz", "/readyz", "/metrics",
    "/openapi.json", "/v1/admin/keys", "/v1/admin/keys/{key_id}",
    "/v1/admin/keys/{key_id}/rotate", "/v1/admin/keys/{key_id}/revoke", "/v1/admin/usage",
    "/v1/admin/blocks"})
STATUS_CODES: Final = ("200", "201", "400", "401", "403", "404", "405", "409", "413", "422",
                       "429", "500", "503")
DECISION_RESULTS: Final = frozenset({"allowed", "denied", "invalid", "unauthenticated",
                                     "blocked", "error", "degraded"})
REDIS_CALLS: Final = frozenset({"reserve", "commit", "release", "resize", "load", "ready",
                                "admin"})
REDIS_ERRORS: Final = ("TimeoutError", "ConnectionError", "ResponseError", "BusyLoadingError",
                       "ReadOnlyError", "AuthenticationError")
# (kind, severity) of every alert there is: a cost threshold's severity names which one
ALERT_LABELS: Final = frozenset((kind, severity) for kind, severities in SEVERITIES.items()
                                for severity in severities)
BLOCK_CAUSES: Final = frozenset({"auth_failures", "anomaly", "admin"})
BLOCK_SCOPES: Final = frozenset({"key", "user", "org", "ip", "ip_prefix", "global"})

# Seconds. The daemon answers in about a millisecond; Redis calls in tens to hundreds of µs.
HTTP_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5)
REDIS_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25)
NANO_PER_USD: Final = 1_000_000_000
_SEP: Final = "\x1f"  # joins a family name and label values into a file key (never in a value)


def bounded(value: str | None, allowed: frozenset[str]) -> str:
    return value if value is not None and value in allowed else OTHER


class MetricsDirectory:
    """The per-daemon directory of the workers' sample files: made empty at startup (samples
    of an earlier run must not be added to this one's), removed at exit."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: str | None = None) -> MetricsDirectory:
        """Under $RUNTIME_DIRECTORY when systemd gives one, else the temp directory. Call it in
        the supervisor before forking, and pass `path` to each worker's Metrics."""
        base = parent or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        return cls(Path(tempfile.mkdtemp(prefix="ratelimitd-metrics-", dir=base)))

    def mark_dead(self, pid: int) -> None:
        """A worker exited: its totals stay in the sum, it no longer counts as up."""
        live = self.path / f"{pid}.json"
        with contextlib.suppress(FileNotFoundError):
            live.rename(self.path / f"dead-{pid}.json")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    help: str
    kind: str  # counter | histogram
    labelnames: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def width(self) -> int:
        """Floats per child: a counter's value; a histogram's buckets, +Inf, and sum."""
        return len(self.buckets) + 2 if self.kind == "histogram" else 1


class Counter:
    """A pre-resolved counter child: an index into its process's list of values."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: list[float], index: int) -> None:
        self._values = values
        self._index = index

    def inc(self, amount: float = 1.0) -> None:
        self._values[self._index] += amount


class Histogram:
    """A pre-resolved histogram child: per-bucket (not cumulative) counts, then the sum."""

    __slots__ = ("_base", "_bounds", "_sum", "_values")

    def __init__(self, values: list[float], base: int, bounds: tuple[float, ...]) -> None:
        self._values = values
        self._base = base
        self._bounds = bounds
        self._sum = base + len(bounds) + 1

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is "less or equal")
        self._values[self._base + bisect.bisect_left(self._bounds, seconds)] += 1
        self._values[self._sum] += seconds


class _Samples:
    """This process's values: one flat list, children are offsets into it."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.offsets: dict[tuple[str, tuple[str, ...]], int] = {}
        self.pid = os.getpid()

    def offset(self, family: _Family, labels: tuple[str, ...]) -> int:
        key = (family.name, labels)
        found = self.offsets.get(key)
        if found is None:
            found = self.offsets[key] = len(self.values)
            self.values.extend([0.0] * family.width)
        return found

    def counter(self, family: _Family, labels: tuple[str, ...]) -> Counter:
        return Counter(self.values, self.offset(family, labels))

    def histogram(self, family: _Family, labels: tuple[str, ...]) -> Histogram:
        return Histogram(self.values, self.offset(family, labels), family.buckets)

    def snapshot(self) -> dict[str, list[float]]:
        return {_SEP.join((name, *labels)): self.values[at:at + self._width(name)]
                for (name, labels), at in self.offsets.items()}

    def _width(self, name: str) -> int:
        return FAMILIES[name].width


FAMILIES: Final = {f.name: f for f in (
    _Family("ratelimitd_decisions", "Reserve decisions by result, reason (the denying limit's "
            "name, an error code, or none) and tier", "counter", ("result", "reason", "tier")),
    _Family("ratelimitd_http_request_duration_seconds", "Time to answer, per route",
            "histogram", ("route",), HTTP_BUCKETS),
    _Family("ratelimitd_http_responses", "Answers per route and status code", "counter",
            ("route", "code")),
    _Family("ratelimitd_redis_call_duration_seconds", "Time of one Redis call, per kind",
            "histogram", ("call",), REDIS_BUCKETS),
    _Family("ratelimitd_redis_errors", "Failed Redis calls by kind and error", "counter",
            ("call", "error")),
    _Family("ratelimitd_reservations", "Reservations committed, released, or found expired by "
            "a commit or release", "counter", ("event",)),
    _Family("ratelimitd_tokens", "Tokens reserved (input + granted output) and committed "
            "(actual usage)", "counter", ("stage", "tier", "model")),
    _Family("ratelimitd_cost_usd", "USD reserved and committed", "counter",
            ("stage", "tier", "model")),
    _Family("ratelimitd_overruns", "Commits whose actual usage exceeded the reservation",
            "counter", ("tier", "model")),
    _Family("ratelimitd_overrun_tokens", "Tokens used beyond the reservation", "counter",
            ("tier", "model")),
    _Family("ratelimitd_alerts", "Alerts raised, by kind and severity", "counter",
            ("kind", "severity")),
    _Family("ratelimitd_blocks", "Blocks placed, by scope and cause", "counter",
            ("scope", "cause")),
    _Family("ratelimitd_shadow_over", "Decisions a shadow limit would have denied (it never "
            "denies), per limit: a tier limit's name or an Envoy rule's path", "counter",
            ("limit",)),
    _Family("ratelimitd_unreplicated_settles", "Commits and releases applied but not "
            "acknowledged by [redis] replicas_ack replicas in time", "counter", ("call",)),
)}
SETTLE_CALLS: Final = ("commit", "release")


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
        self._samples = _Samples()
        self._children: dict[tuple[str, tuple[str, ...]], Counter] = {}
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

    def decision(self, result: str, reason: str | None, tier: str | None) -> None:
        """One reserve's outcome: result allowed/denied/invalid/…, reason the denying limit's
        name or the error code (None when allowed)."""
        labels = (bounded(result, DECISION_RESULTS),
                  "none" if reason is None else bounded(reason, self.reasons),
                  bounded(tier, self.tiers))
        self._counter("ratelimitd_decisions", labels).inc()

    def reserved(self, tier: str | None, model: str | None, tokens: int, cost_nano: int) -> None:
        labels = ("reserved", bounded(tier, self.tiers), bounded(model, self.models))
        self._counter("ratelimitd_tokens", labels).inc(tokens)
        self._counter("ratelimitd_cost_usd", labels).inc(cost_nano / NANO_PER_USD)

    def committed(self, tier: str | None, model: str | None, tokens: int, cost_nano: int,
                  overrun_tokens: int = 0) -> None:
        """A first commit (not a duplicate): its actual usage, and its overrun if any."""
        t, m = bounded(tier, self.tiers), bounded(model, self.models)
        self._counter("ratelimitd_reservations", ("committed",)).inc()
        self._counter("ratelimitd_tokens", ("committed", t, m)).inc(tokens)
        self._counter("ratelimitd_cost_usd", ("committed", t, m)).inc(cost_nano / NANO_PER_USD)
        if overrun_tokens > 0:
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
        """Writes this process's values to its file (whole, then renamed over the old one)."""
        if self.directory is None:
            return
        if os.getpid() != self._samples.pid:
            raise RuntimeError("Metrics were built before a fork; build them in each worker")
        target = self.directory / f"{self._samples.pid}.json"
        partial = target.with_suffix(".tmp")
        try:
            partial.write_bytes(orjson.dumps(self._samples.snapshot()))
            partial.replace(target)
        except OSError as exc:  # a full disk or a removed directory must not stop serving
            if not self._flush_warned:
                log.warning("cannot write metrics to %s: %s", target, exc)
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
        """The /metrics body (content type CONTENT_TYPE): this process's live values plus every
        other worker's last flush, live or dead."""
        merged: dict[str, list[float]] = {}
        workers_up = 1
        if self.directory is not None:
            own = f"{self._samples.pid}.json"
            for path in self.directory.glob("*.json"):
                if path.name == own:
                    continue
                try:
                    theirs = orjson.loads(path.read_bytes())
                except (FileNotFoundError, orjson.JSONDecodeError):
                    continue  # renamed by mark_dead meanwhile; read on the next scrape
                workers_up += not path.name.startswith("dead-")
                _add(merged, theirs)
        _add(merged, self._samples.snapshot())
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Rendered(merged, workers_up))
        return generate_latest(registry)


def _add(into: dict[str, list[float]], values: dict[str, list[float]]) -> None:
    for key, numbers in values.items():
        have = into.get(key)
        if have is None:
            into[key] = list(numbers)
        elif len(have) == len(numbers):  # a file of another build's layout is skipped
            for i, number in enumerate(numbers):
                have[i] += number


class _Rendered(Collector):
    """Summed values as prometheus-client metric families."""

    def __init__(self, merged: dict[str, list[float]], workers_up: int) -> None:
        self.merged = merged
        self.workers_up = workers_up

    def collect(self) -> Iterator[Metric]:
        by_family: dict[str, list[tuple[list[str], list[float]]]] = {}
        for key, numbers in sorted(self.merged.items()):
            name, *labels = key.split(_SEP)
            if name in FAMILIES:
                by_family.setdefault(name, []).append((labels, numbers))
        for name, family in FAMILIES.items():
            children = by_family.get(name, [])
            if family.kind == "counter":
                counter = CounterMetricFamily(name, family.help, labels=family.labelnames)
                for labels, numbers in children:
                    counter.add_metric(labels, numbers[0])
                yield counter
            else:
                yield _histogram(family, children)
        up = GaugeMetricFamily("ratelimitd_workers_up", "Worker processes serving")
        up.add_metric([], self.workers_up)
        yield up


def _histogram(family: _Family, children: Sequence[tuple[list[str], list[float]]]
               ) -> HistogramMetricFamily:
    histogram = HistogramMetricFamily(family.name, family.help, labels=family.labelnames)
    bounds = [*(floatToGoString(b) for b in family.buckets), "+Inf"]  # type: ignore[no-untyped-call]
    for labels, numbers in children:
        cumulative, buckets = 0.0, []
        for bound, count in zip(bounds, numbers[:-1], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        histogram.add_metric(labels, buckets, sum_value=numbers[-1])
    return histogram
