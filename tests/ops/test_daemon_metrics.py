"""`GET /metrics` of a real daemon after real traffic: every family, bounded labels only,
and with `--workers 2` one view whose counts add up across the workers."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon, daemons, embedded_redis_pids, redis_pid, wait_healthy
from tests.support.redis_servers import free_port

__all__ = ["daemons", "embedded_redis_pids"]  # fixtures

FAMILIES = ("ratelimitd_decisions", "ratelimitd_http_request_duration_seconds",
            "ratelimitd_http_responses", "ratelimitd_redis_call_duration_seconds",
            "ratelimitd_redis_errors", "ratelimitd_reservations", "ratelimitd_tokens",
            "ratelimitd_cost_usd", "ratelimitd_overruns", "ratelimitd_overrun_tokens",
            "ratelimitd_alerts", "ratelimitd_blocks", "ratelimitd_workers_up")
USERS = [f"user-secret-{i}" for i in range(12)]


def config_text(port: int, data_dir: Path) -> str:
    return f'''
[server]
listen = ["127.0.0.1:{port}"]

[redis]
data_dir = "{data_dir}"

[tiers.t]
requests_per_minute = 3
'''


def call(port: int, method: str, path: str, body: object = None) -> tuple[int, bytes, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     method=method, headers={"X-Forwarded-For": "10.9.8.7",
                                                     "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers["Content-Type"]


def traffic(port: int) -> dict[str, int]:
    """Per user: 3 reserves allowed (one committed, one released), one denied; one invalid."""
    counts = {"allowed": 0, "denied": 0, "invalid": 0, "committed": 0, "released": 0}
    for user in USERS:
        ids = []
        for _ in range(4):
            status, body, _ = call(port, "POST", "/v1/reserve", {
                "user": user, "tier": "t", "model": "gpt-4o", "input_tokens": 100,
                "max_output_tokens": 50})
            if status == 200:
                counts["allowed"] += 1
                ids.append(json.loads(body)["reservation_id"])
            else:
                assert status == 429, body
                counts["denied"] += 1
        assert call(port, "POST", "/v1/commit", {"reservation_id": ids[0], "input_tokens": 100,
                                                 "output_tokens": 80})[0] == 200
        counts["committed"] += 1
        assert call(port, "POST", "/v1/release", {"reservation_id": ids[1]})[0] == 200
        counts["released"] += 1
    assert call(port, "POST", "/v1/reserve", {"user": "x", "tier": "t"})[0] == 400
    counts["invalid"] += 1
    return counts


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    status, body, content_type = call(port, "GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    text = body.decode()
    for user in USERS:
        assert user not in text
    assert "10.9.8.7" not in text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = (
                sample.value)
    return samples


def total(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str,
          **labels: str) -> float:
    return sum(value for key, value in samples.get(name, {}).items()
               if labels.items() <= dict(key).items())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_scrape_after_traffic_has_every_family_and_the_counts_of_every_worker(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int],
        workers: str) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir), "--workers", workers)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    counts = traffic(port)
    time.sleep(1.5)  # each worker writes its samples once a second
    samples = scrape(port)
    names = {name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count")
             .removesuffix("_sum").removesuffix("_created") for name in samples}
    assert set(FAMILIES) <= names
    assert total(samples, "ratelimitd_workers_up") == int(workers)
    assert total(samples, "ratelimitd_decisions_total", result="allowed", tier="t") == (
        counts["allowed"])
    assert total(samples, "ratelimitd_decisions_total", result="denied", tier="t",
                 reason="requests_per_minute") == counts["denied"]
    assert total(samples, "ratelimitd_decisions_total", result="invalid") == counts["invalid"]
    assert total(samples, "ratelimitd_reservations_total", event="committed") == (
        counts["committed"])
    assert total(samples, "ratelimitd_reservations_total", event="released") == (
        counts["released"])
    assert total(samples, "ratelimitd_tokens_total", stage="reserved", tier="t",
                 model="gpt-4o") == counts["allowed"] * 150
    assert total(samples, "ratelimitd_tokens_total", stage="committed") == (
        counts["committed"] * 180)
    assert total(samples, "ratelimitd_overruns_total") == counts["committed"]
    assert total(samples, "ratelimitd_cost_usd_total", stage="reserved") > 0
    reserves = counts["allowed"] + counts["denied"] + counts["invalid"]
    assert total(samples, "ratelimitd_http_request_duration_seconds_count",
                 route="/v1/reserve") == reserves
    assert total(samples, "ratelimitd_redis_call_duration_seconds_count", call="reserve") == (
        counts["allowed"] + counts["denied"])
    assert total(samples, "ratelimitd_http_responses_total", route="/v1/reserve",
                 code="429") == counts["denied"]
    allowed_labels = {"result", "reason", "tier", "route", "code", "call", "error", "event",
                      "stage", "model", "kind", "severity", "scope", "cause", "le"}
    for series in samples.values():
        for key in series:
            assert {name for name, _ in key} <= allowed_labels
    assert daemon.stop() == 0, daemon.log
