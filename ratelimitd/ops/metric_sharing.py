"""How the workers' metrics add up: each writes its samples to its own file in the daemon's
metrics directory (whole, then renamed); /metrics sums the other workers' files with the
answering worker's live values and renders them in the Prometheus text format."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
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

from ratelimitd.ops.metric_catalogue import FAMILIES, Family
from ratelimitd.ops.metric_samples import SEP, Samples

CONTENT_TYPE: Final = prometheus_client.CONTENT_TYPE_LATEST


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


def write_samples(directory: Path, samples: Samples) -> None:
    """This process's values to its file (whole, then renamed over the old one)."""
    target = directory / f"{samples.pid}.json"
    partial = target.with_suffix(".tmp")
    partial.write_bytes(orjson.dumps(samples.snapshot()))
    partial.replace(target)


def render(directory: Path | None, samples: Samples) -> bytes:
    """The /metrics body (content type CONTENT_TYPE): `samples` live plus every other worker's
    last file, live or dead."""
    merged: dict[str, list[float]] = {}
    workers_up = 1
    if directory is not None:
        own = f"{samples.pid}.json"
        for path in directory.glob("*.json"):
            if path.name == own:
                continue
            try:
                theirs = orjson.loads(path.read_bytes())
            except (FileNotFoundError, orjson.JSONDecodeError):
                continue  # renamed by mark_dead meanwhile; read on the next scrape
            workers_up += not path.name.startswith("dead-")
            _add(merged, theirs)
    _add(merged, samples.snapshot())
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
            name, *labels = key.split(SEP)
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


def _histogram(family: Family, children: Sequence[tuple[list[str], list[float]]]
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
