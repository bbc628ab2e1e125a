"""Metrics: forked workers record, the parent renders one view; no label is unbounded."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ratelimitd.errors import ERROR_CODES
from ratelimitd.ops.metric_catalogue import OTHER, ROUTES
from ratelimitd.ops.metric_sharing import MetricsDirectory
from ratelimitd.ops.metrics import CALLS_KEPT, Metrics

TIERS = ("free", "pro")
MODELS = ("gpt-4o", "gpt-4")
LIMITS = ("requests_per_minute", "tokens_per_day", "ip_prefix_rpm")
# what callers control: none may ever show up as a label value
CALLER_VALUES = ("user-12345", "rlk_secret", "10.1.2.3", "10.1.2.0/24", "my-finetune-u9",
                 "/v1/reserve/../../etc", "rsv_abc")


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Iterator[MetricsDirectory]:
    directory = MetricsDirectory.create(str(tmp_path))
    yield directory
    directory.remove()
    assert not directory.path.exists()


def new_metrics(directory: MetricsDirectory | None) -> Metrics:
    return Metrics(TIERS, MODELS, LIMITS, attribute_scopes=("device",),
                   directory=directory.path if directory else None)


def record(metrics: Metrics, times: int) -> None:
    """What one worker sees: `times` rounds of traffic, some with caller-chosen values."""
    reserve = metrics.route("/v1/reserve")
    unknown = metrics.route("/v1/reserve/../../etc")
    redis_reserve = metrics.redis_call("reserve")
    for _ in range(times):
        metrics.decision("allowed", None, "free")
        metrics.decision("denied", "requests_per_minute", "free")
        metrics.decision("denied", "rlk_secret", "user-12345")  # neither a limit nor a tier
        metrics.reserved("free", "gpt-4o", 1_500, 2_500_000)
        metrics.reserved("pro", "my-finetune-u9", 100, 1_000)
        metrics.committed("free", "gpt-4o", 1_200, 2_000_000)
        metrics.committed("free", "gpt-4o", 2_000, 4_000_000, overrun_tokens=500)
        metrics.released()
        metrics.expired()
        reserve.observe(200, 0.0012)
        reserve.observe(429, 0.0009)
        unknown.observe(404, 0.0001)
        redis_reserve.observe(0.0002)
        redis_reserve.error(TimeoutError())
        metrics.alert("cost_threshold", "critical")
        metrics.alert("10.1.2.3", "high")
        metrics.block("ip", "auth_failures")
        metrics.block("10.1.2.0/24", "anomaly")


def _worker(directory: MetricsDirectory, times: int) -> None:
    metrics = new_metrics(directory)  # built in the worker, after the fork
    record(metrics, times)
    metrics.flush()


def samples(text: bytes) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text.decode())
            for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    matching = [s.value for s in found if s.name == name and s.labels == labels]
    assert len(matching) == 1, (name, labels, matching)
    return matching[0]


def test_forked_workers_add_up_in_one_render(metrics_dir: MetricsDirectory) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(metrics_dir, n)) for n in (3, 4)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(10)
        assert proc.exitcode == 0
    # a third worker, this process, answers the scrape: its live values and the others' files
    this = new_metrics(metrics_dir)
    record(this, 2)
    found = samples(this.render())
    n = 3 + 4 + 2

    assert value(found, "ratelimitd_decisions_total", result="allowed", reason="none",
                 tier="free") == n
    assert value(found, "ratelimitd_decisions_total", result="denied",
                 reason="requests_per_minute", tier="free") == n
    assert value(found, "ratelimitd_decisions_total", result="denied", reason=OTHER,
                 tier=OTHER) == n
    assert value(found, "ratelimitd_tokens_total", stage="reserved", tier="free",
                 model="gpt-4o") == n * 1_500
    assert value(found, "ratelimitd_tokens_total", stage="reserved", tier="pro",
                 model=OTHER) == n * 100
    assert value(found, "ratelimitd_tokens_total", stage="committed", tier="free",
                 model="gpt-4o") == n * 3_200
    assert value(found, "ratelimitd_cost_usd_total", stage="committed", tier="free",
                 model="gpt-4o") == pytest.approx(n * 0.006)
    assert value(found, "ratelimitd_overruns_total", tier="free", model="gpt-4o") == n
    assert value(found, "ratelimitd_overrun_tokens_total", tier="free",
                 model="gpt-4o") == n * 500
    for event, per_round in (("committed", 2), ("released", 1), ("expired", 1)):
        assert value(found, "ratelimitd_reservations_total", event=event) == n * per_round
    assert value(found, "ratelimitd_http_request_duration_seconds_count",
                 route="/v1/reserve") == 2 * n
    assert value(found, "ratelimitd_http_request_duration_seconds_sum",
                 route="/v1/reserve") == pytest.approx(n * 0.0021)
    assert value(found, "ratelimitd_http_request_duration_seconds_bucket", route="/v1/reserve",
                 le="0.0005") == 0
    assert value(found, "ratelimitd_http_request_duration_seconds_bucket", route="/v1/reserve",
                 le="0.001") == n
    assert value(found, "ratelimitd_http_request_duration_seconds_bucket", route="/v1/reserve",
                 le="+Inf") == 2 * n
    assert value(found, "ratelimitd_http_responses_total", route="/v1/reserve",
                 code="429") == n
    assert value(found, "ratelimitd_http_responses_total", route=OTHER, code="404") == n
    assert value(found, "ratelimitd_redis_call_duration_seconds_count", call="reserve") == n
    assert value(found, "ratelimitd_redis_errors_total", call="reserve",
                 error="TimeoutError") == n
    assert value(found, "ratelimitd_alerts_total", kind="cost_threshold",
                 severity="critical") == n
    assert value(found, "ratelimitd_alerts_total", kind=OTHER, severity=OTHER) == n
    assert value(found, "ratelimitd_blocks_total", scope="ip", cause="auth_failures") == n
    assert value(found, "ratelimitd_blocks_total", scope=OTHER, cause="anomaly") == n
    assert value(found, "ratelimitd_workers_up") == 3

    for proc in workers:  # the supervisor reaps them: no longer up, their totals stay
        assert proc.pid is not None
        metrics_dir.mark_dead(proc.pid)
    after = samples(this.render())
    assert value(after, "ratelimitd_workers_up") == 1
    assert value(after, "ratelimitd_decisions_total", result="allowed", reason="none",
                 tier="free") == n


def test_no_label_carries_a_caller_value(metrics_dir: MetricsDirectory) -> None:
    metrics = new_metrics(metrics_dir)
    record(metrics, 2)
    allowed = {
        "tier": {*TIERS, OTHER}, "model": {*MODELS, OTHER}, "route": {*ROUTES, OTHER},
        "reason": {*LIMITS, *ERROR_CODES, OTHER, "none"},
    }
    found = samples(metrics.render())
    assert found
    for sample in found:
        for label, label_value in sample.labels.items():
            assert label_value not in CALLER_VALUES, (sample.name, label)
            if label in allowed:
                assert label_value in allowed[label], (sample.name, label, label_value)


def test_reload_widens_the_allowed_values_and_keeps_totals() -> None:
    metrics = new_metrics(None)
    metrics.decision("allowed", None, "team")
    metrics.decision("allowed", None, "free")
    metrics.reconfigure((*TIERS, "team"), MODELS, LIMITS)
    metrics.decision("allowed", None, "team")
    metrics.decision("allowed", None, "free")
    found = samples(metrics.render())
    for tier, expected in ((OTHER, 1), ("team", 1), ("free", 2)):
        assert value(found, "ratelimitd_decisions_total", result="allowed", reason="none",
                     tier=tier) == expected


def test_callers_naming_ever_new_tiers_are_counted_as_other_in_bounded_memory() -> None:
    metrics = new_metrics(None)
    calls = CALLS_KEPT + 100
    for n in range(calls):
        metrics.decision("invalid", "invalid_request", f"made-up-{n}")
        metrics.reserved(f"made-up-{n}", "gpt-4o", 10, 1_000)
    assert len(metrics._by_call) <= CALLS_KEPT
    found = samples(metrics.render())
    assert value(found, "ratelimitd_decisions_total", result="invalid",
                 reason="invalid_request", tier=OTHER) == calls
    assert value(found, "ratelimitd_tokens_total", stage="reserved", tier=OTHER,
                 model="gpt-4o") == 10 * calls


def test_every_family_is_in_the_first_scrape() -> None:
    names = {s.name for s in samples(new_metrics(None).render())}
    for family in ("ratelimitd_decisions_total", "ratelimitd_reservations_total",
                   "ratelimitd_tokens_total", "ratelimitd_cost_usd_total",
                   "ratelimitd_overruns_total", "ratelimitd_overrun_tokens_total",
                   "ratelimitd_alerts_total", "ratelimitd_blocks_total",
                   "ratelimitd_workers_up"):
        assert family in names, family


def _render_elsewhere(directory: MetricsDirectory, out: Connection) -> None:
    out.send_bytes(new_metrics(directory).render())


def test_a_worker_flushes_on_its_own_schedule(metrics_dir: MetricsDirectory) -> None:
    """run_flusher writes the file the other workers read, and once more when cancelled."""
    metrics = new_metrics(metrics_dir)

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(metrics.run_flusher(0.05))
        metrics.decision("allowed", None, "pro")
        await asyncio.sleep(0.15)
        assert (metrics_dir.path / f"{os.getpid()}.json").exists()
        metrics.decision("allowed", None, "pro")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    reader = context.Process(target=_render_elsewhere, args=(metrics_dir, send))
    reader.start()
    found = samples(receive.recv_bytes())
    reader.join(10)
    assert value(found, "ratelimitd_decisions_total", result="allowed", reason="none",
                 tier="pro") == 2


def test_a_failed_flush_does_not_stop_the_worker(tmp_path: Path) -> None:
    directory = MetricsDirectory.create(str(tmp_path))
    metrics = new_metrics(directory)
    directory.remove()  # e.g. the supervisor cleaned up first
    metrics.flush()
    metrics.decision("allowed", None, "free")
    found = samples(metrics.render())
    assert value(found, "ratelimitd_decisions_total", result="allowed", reason="none",
                 tier="free") == 1
