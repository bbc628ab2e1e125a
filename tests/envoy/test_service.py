"""Envoy's rate limit service: a real gRPC client (the xds-protos stubs) over a real socket
against a real `ratelimitd serve` on a real Redis, with envoyproxy/ratelimit's YAML rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.daemons import DaemonProcess
from tests.support.faults import DurableRedis
from tests.support.redis_servers import RedisServer, free_port

HERE = Path(__file__).parent
Entries = list[tuple[str, str]]
OK, OVER = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT


class Rls:
    """A gRPC client of one daemon's rate limit service."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def ask(self, domain: str, *descriptors: Entries | tuple[Entries, int], hits: int = 0,
            request_id: str | None = None) -> Any:
        """One call; a descriptor given as (entries, n) carries its own hits_addend n; a
        request_id is a last entry `x-request-id` of each descriptor, as Envoy's
        `request_headers` action adds it."""
        request = rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits)
        for desc in descriptors:
            entries, own = desc if isinstance(desc, tuple) else (desc, None)
            if request_id is not None:
                entries = [*entries, ("x-request-id", request_id)]
            out = ratelimit_pb2.RateLimitDescriptor(entries=[
                ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])
            if own is not None:
                out.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=own))
            request.descriptors.append(out)
        return self.stub.ShouldRateLimit(request, timeout=10)


def start(tmp: Path, redis_url: str, rest: str = "", name: str = "d", workers: int = 1,
          on_error: str = "deny") -> tuple[DaemonProcess, Rls]:
    for yaml in HERE.glob("*.yaml"):
        shutil.copy(yaml, tmp / yaml.name)
    grpc_port = free_port()
    daemon = DaemonProcess(tmp, f'url = "{redis_url}"\ntimeout_ms = 200\non_error = "{on_error}"',
                           f'[grpc]\nlisten = ["127.0.0.1:{grpc_port}"]\n'
                           f'[envoy]\nconfig = ["*.yaml"]\nresponse_headers = true\n{rest}',
                           "--workers", str(workers), name=name)
    daemon.wait_ready()
    return daemon, Rls(grpc_port)


@pytest.fixture(scope="module")
def rls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rls]:
    tmp = tmp_path_factory.mktemp("envoy")
    redis = RedisServer(tmp / "redis")
    daemon, client = start(tmp, redis.url)
    yield client
    client.channel.close()
    daemon.stop()
    redis.stop()


def unique() -> str:
    return uuid.uuid4().hex[:12]


def test_health_serves(rls: Rls) -> None:
    for service in ("", "envoy.service.ratelimit.v3.RateLimitService"):
        answer = rls.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_readme_example_2_nested_and_aggregate(rls: Rls) -> None:
    number = unique()
    marketing = [("message_type", "marketing"), ("to_number", number)]
    for _ in range(5):
        answer = rls.ask("messaging", marketing, [("to_number", number)])
        assert answer.overall_code == OK
    answer = rls.ask("messaging", marketing, [("to_number", number)])
    assert answer.overall_code == OVER
    assert [s.code for s in answer.statuses] == [OVER, OK]
    assert answer.statuses[0].current_limit.requests_per_unit == 5
    assert answer.statuses[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.DAY
    # all or nothing: the denied request charged neither descriptor
    alone = rls.ask("messaging", [("to_number", number)])
    assert alone.overall_code == OK and alone.statuses[0].limit_remaining == 94
    # another number has its own counters
    assert rls.ask("messaging", [("message_type", "marketing"),
                                 ("to_number", unique())]).overall_code == OK


def test_readme_example_3_most_specific_and_unmatched(rls: Rls) -> None:
    assert rls.ask("edge_proxy_per_ip", [("remote_address", "50.0.0.5")]).overall_code == OVER
    ip = f"10.{unique()}"
    answers = [rls.ask("edge_proxy_per_ip", [("remote_address", ip)]).overall_code
               for _ in range(11)]
    assert answers == [OK] * 10 + [OVER]
    # example 4: deeper than the rules, unknown keys and domains match nothing: OK
    for domain, entries in (("edge_proxy_per_ip", [("remote_address", ip), ("x", "y")]),
                            ("edge_proxy_per_ip", [("other", "1")]), ("nope", [("a", "b")])):
        answer = rls.ask(domain, entries)
        assert answer.overall_code == OK and not answer.statuses[0].HasField("current_limit")


def test_unlimited_wildcards_and_shared_wildcards(rls: Rls) -> None:
    answer = rls.ask("more", [("ldap", "x")])
    assert answer.overall_code == OK and answer.statuses[0].limit_remaining == 2**32 - 1
    tag = unique()
    for path in (f"/api/{tag}/1", f"/api/{tag}/2"):     # each value counts on its own
        assert [rls.ask("more", [("path", path)]).overall_code for _ in range(3)] == [
            OK, OK, OVER]
    shared = [rls.ask("more", [("shared", f"v{tag}{i}")]).overall_code for i in range(3)]
    assert shared in ([OK, OK, OVER], [OVER, OVER, OVER])  # one counter for every v*
    assert rls.ask("more", [("shared", "w1")]).overall_code == OK   # no rule


def test_shadow_rule_never_denies(rls: Rls) -> None:
    service = unique()
    codes = [rls.ask("more", [("service", service), ("user", "user-a")]).overall_code
             for _ in range(3)]
    assert codes == [OK, OK, OK]


def test_shadow_overs_counted_per_rule_and_logged_once_a_window(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    daemon, client = start(tmp_path, redis.url)
    try:
        shadow = [("service", unique()), ("user", "user-a")]     # 1 a minute, shadow_mode
        codes = [client.ask("more", shadow).overall_code for _ in range(4)]
        assert codes == [OK] * 4
        for _ in range(3):      # a plain rule over its limit is no shadow over
            client.ask("more", [("b", unique())])
        with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        assert 'ratelimitd_shadow_over_total{limit="more.service.user_user-a"} 3.0' in text
        assert 'ratelimitd_shadow_over_total{limit="more.b"}' not in text
        lines = [line for line in daemon.log_path.read_text().splitlines()
                 if '"event":"shadow_over"' in line]
        assert len(lines) == 1 and "more.service.user_user-a" in lines[0], lines
    finally:
        client.channel.close()
        daemon.stop()
        redis.stop()


def test_replaces(rls: Rls) -> None:
    both = [[("key_1", "value_1"), ("user", "bkthomps")],
            [("key_2", "value_2"), ("user", "bkthomps")]]
    codes = [rls.ask("more", *both).overall_code for _ in range(2)]
    answer = rls.ask("more", *both)
    # specific_limit is replaced: only the 3 a minute of the second rule counts
    assert not answer.statuses[0].HasField("current_limit")
    assert answer.statuses[1].current_limit.requests_per_unit == 3
    assert codes == [OK, OK] and answer.overall_code == OK
    assert rls.ask("more", *both).overall_code == OVER
    # and the replaced rule was not charged: alone, its 1 a minute is still there
    assert rls.ask("more", both[0]).overall_code == OK


def test_hits_addend_request_and_descriptor(rls: Rls) -> None:
    a, b = unique(), unique()
    answer = rls.ask("more", [("a", a)], ([("b", b)], 0), hits=2)
    assert answer.overall_code == OK and answer.statuses[0].limit_remaining == 0
    assert rls.ask("more", [("a", a)]).overall_code == OVER
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    assert headers["RateLimit-Limit"] in ("1", "2") and "RateLimit-Reset" in headers


def test_ai_gateway_two_calls_exactly_once(rls: Rls) -> None:
    user = unique()
    desc = [("tokens", user)]
    call = str(uuid.uuid4())
    # as the request arrives: the budget is not spent, nothing is charged
    for _ in range(2):
        arrives = rls.ask("more", (desc, 0), request_id=call)
        assert arrives.overall_code == OK
        assert arrives.statuses[0].current_limit.requests_per_unit == 100
    for _ in range(3):      # Envoy retries the stream-done call: charged once
        done = rls.ask("more", (desc, 60), request_id=call)
        assert done.overall_code == OK and done.statuses[0].limit_remaining == 40
    assert rls.ask("more", (desc, 0)).statuses[0].limit_remaining == 40
    # another call's usage past the limit: charged in full, the next request sees it
    over = str(uuid.uuid4())
    assert rls.ask("more", (desc, 0), request_id=over).overall_code == OK
    for _ in range(2):
        assert rls.ask("more", (desc, 70), request_id=over).overall_code == OVER
    arrives = rls.ask("more", (desc, 0), request_id=str(uuid.uuid4()))
    assert arrives.overall_code == OVER and arrives.statuses[0].limit_remaining == 0
    # 130 charged, not 200: a plain descriptor of the same user is over by 30
    assert rls.ask("more", (desc, 0)).overall_code == OVER


def test_stream_done_without_identity_charged_per_call(rls: Rls) -> None:
    """No `x-request-id` entry: nothing names the call, and each retry is charged."""
    desc = [("tokens", unique())]
    for _ in range(2):
        assert rls.ask("more", (desc, 30)).overall_code == OK
    assert rls.ask("more", (desc, 0)).statuses[0].limit_remaining == 40


def test_request_id_entry_takes_no_part_in_matching(rls: Rls) -> None:
    ip = f"10.{unique()}"
    codes = [rls.ask("edge_proxy_per_ip", [("remote_address", ip)],
                     request_id=str(uuid.uuid4())).overall_code for _ in range(11)]
    assert codes == [OK] * 10 + [OVER]      # the rule of remote_address, one counter


def test_exact_admission_three_daemons(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
    started = [start(tmp_path / f"d{i}", redis.url, name=f"d{i}") for i in range(3)]
    try:
        request = rls_pb2.RateLimitRequest(domain="more", descriptors=[   # 100 an hour
            ratelimit_pb2.RateLimitDescriptor(entries=[
                ratelimit_pb2.RateLimitDescriptor.Entry(key="tokens", value=unique())])])
        # all 400 in flight at once, a third to each daemon
        calls = [started[k % 3][1].stub.ShouldRateLimit.future(request, timeout=30)
                 for k in range(400)]
        codes = [call.result().overall_code for call in calls]
        assert codes.count(OK) == 100 and codes.count(OVER) == 300
    finally:
        for daemon, client in started:
            client.channel.close()
            daemon.stop()
        redis.stop()


@dataclass(frozen=True)
class Answered:
    code: int
    decided: bool       # by Redis (statuses); False: by [redis] on_error, Redis unreachable
    seconds: float


def load_until(client: Rls, entries: Entries, stop: threading.Event, threads: int = 16
               ) -> list[Answered]:
    """Calls from `threads` threads until `stop` is set; every answer, in no order."""
    answers: list[Answered] = []

    def worker() -> None:
        while not stop.is_set():
            began = time.monotonic()
            answer = client.ask("more", entries)
            answers.append(Answered(answer.overall_code, len(answer.statuses) > 0,
                                    time.monotonic() - began))

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(worker)
    return answers


@pytest.mark.parametrize("on_error", ["deny", "allow"])
def test_redis_stalled_mid_load(tmp_path: Path, on_error: str) -> None:
    """SIGSTOP on Redis under 16 callers: [redis] on_error answers within the timeout budget,
    and once Redis runs again the limit (600 an hour) admits no more than it allows."""
    redis = DurableRedis(tmp_path / "redis")
    daemon, client = start(tmp_path, redis.url, on_error=on_error)
    stop = threading.Event()
    entries = [("load", unique())]
    try:
        with ThreadPoolExecutor(1) as runner:
            running = runner.submit(load_until, client, entries, stop)
            time.sleep(0.3)
            redis.stall()
            try:
                time.sleep(1.5)
            finally:
                redis.resume()
            deadline = time.monotonic() + 60      # until the limit is spent, after the stall
            probes = 0
            while (probe := client.ask("more", entries)).overall_code == OK or not probe.statuses:
                probes += probe.overall_code == OK and len(probe.statuses) > 0
                assert time.monotonic() < deadline
            stop.set()
            answers = running.result()
        degraded = [a for a in answers if not a.decided]
        admitted = probes + sum(1 for a in answers if a.decided and a.code == OK)
        assert degraded, "the stall answered nothing by on_error"
        assert {a.code for a in degraded} == {OVER if on_error == "deny" else OK}
        # [redis] timeout_ms = 200: a stalled Redis costs a call a fraction of a second
        assert max(a.seconds for a in answers) < 3.0
        # exact: a call answered by on_error may or may not have been counted by Redis
        assert 600 - len(degraded) <= admitted <= 600
        # thousands of calls answered by on_error, a few log lines
        unavailable = daemon.log_path.read_text().count("redis unavailable")
        assert 1 <= unavailable <= 5, unavailable
    finally:
        stop.set()
        client.channel.close()
        daemon.stop()
        redis.stop()


def test_check_config_names_file_descriptor_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "domain: d\ndescriptors:\n  - key: k\n    descriptors:\n      - key: sub\n"
        "        rate_limit:\n          unit: fortnight\n          requests_per_unit: 1\n")
    (tmp_path / "c.toml").write_text('[envoy]\nconfig = ["bad.yaml"]\n')
    out = subprocess.run([str(Path(sys.executable).parent / "ratelimitd"), "check-config",
                          str(tmp_path / "c.toml")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "bad.yaml: line 7, descriptor d.k.sub: invalid unit 'fortnight'" in out.stderr
    (tmp_path / "rules").mkdir()
    for yaml in HERE.glob("*.yaml"):
        shutil.copy(yaml, tmp_path / "rules" / yaml.name)
    (tmp_path / "c.toml").write_text('[envoy]\nconfig = ["rules/*.yaml"]\n')
    out = subprocess.run([str(Path(sys.executable).parent / "ratelimitd"), "check-config",
                          str(tmp_path / "c.toml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "in domains edge_proxy_per_ip, messaging, more" in out.stdout
