"""Hostile clients against a real `ratelimitd serve` process, over raw sockets.

Silent, slow and idle connections are closed at their deadlines; a flood of them leaves a
normal client served (its latency is measured alongside and printed); bodies in a bad coding,
bearer tokens with bytes that are not UTF-8, and bytes that are not HTTP answer a 4xx in the
error shape or a closed connection, and leave no traceback (and one log line, not one per
request) behind.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, wait_healthy
from tests.support.redis_servers import RedisServer, free_port

HEADER_S, BODY_S, IDLE_S = 1.0, 2.0, 2.0
# the guard sweeps every quarter of the shortest deadline; a close may also wait on the loop
SLACK_S = 1.5
RESERVE = {"user": "u1", "tier": "t", "model": "gpt-4o", "input_tokens": 10,
           "max_output_tokens": 10}


def config(port: int, redis_url: str, *, extra: str = "") -> str:
    return f'''
[server]
listen = ["127.0.0.1:{port}"]
header_timeout_s = {HEADER_S}
body_timeout_s = {BODY_S}
keepalive_timeout_s = {IDLE_S}
{extra}

[redis]
url = "{redis_url}"

[tiers.t]
requests_per_minute = 100000
anomaly = false                        # one user calls far more than a new subject's baseline
'''


@pytest.fixture
def daemon(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    started = Daemon(tmp_path, config(port, redis_server.url))
    wait_healthy(started, port)
    yield started, port
    started.stop()


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Reads until the server closes the connection; (seconds it took, bytes read)."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"still open after {limit_s} s; read {data[:200]!r}")
    return time.monotonic() - started, data


def request(body: bytes, *, headers: str = "", method: str = "POST", path: str = "/v1/reserve"
            ) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"{headers}Connection: close\r\n\r\n").encode() + body


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Sends raw bytes, reads the answer until close: (status, headers, JSON body or bytes)."""
    with connect(port) as sock:
        sock.sendall(raw)
        _, data = read_until_closed(sock, 10)
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    try:
        return status, headers, json.loads(payload)
    except ValueError:
        return status, headers, payload


def assert_error_shape(body: Any, code: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["code"] == code, body


# -- deadlines ----------------------------------------------------------------------------------

def test_a_connection_that_never_sends_a_byte_is_closed_after_header_timeout(
        daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    with connect(port) as sock:
        took, data = read_until_closed(sock, HEADER_S + SLACK_S + 1)
    assert data == b"" and HEADER_S - 0.1 <= took <= HEADER_S + SLACK_S


def test_headers_at_one_byte_per_interval_are_cut_off_at_header_timeout(
        daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    head = b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with connect(port) as sock:
        started = time.monotonic()
        closed = False
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > HEADER_S + SLACK_S + 2:
                break
        if not closed:
            took, _ = read_until_closed(sock, 1)
        took = time.monotonic() - started
    assert took <= HEADER_S + SLACK_S + 0.5, took


def test_a_head_sent_byte_by_byte_then_a_late_body_is_served(
        daemon: tuple[Daemon, int]) -> None:
    """The head's deadline stops at its blank line, even when that line arrives a byte at a
    time: a body arriving after header_timeout_s (within body_timeout_s) is served."""
    _, port = daemon
    body = json.dumps(RESERVE).encode()
    head = (f"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with connect(port) as sock:
        for byte in head:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        time.sleep(HEADER_S + 0.6)   # past the head's deadline and a sweep, within the body's
        sock.sendall(body)
        _, answer = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_body_shorter_than_its_content_length_answers_408_at_body_timeout(
        daemon: tuple[Daemon, int]) -> None:
    daemon_proc, port = daemon
    with connect(port) as sock:
        sock.sendall(b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"user\": ")
        took, data = read_until_closed(sock, BODY_S + SLACK_S + 5)
    assert BODY_S - 0.1 <= took <= BODY_S + SLACK_S, took
    assert data.startswith(b"HTTP/1.1 408"), data
    assert_error_shape(json.loads(data.partition(b"\r\n\r\n")[2]), "request_timeout")
    assert "Traceback" not in daemon_proc.log


def test_a_body_at_one_byte_per_interval_is_cut_off_at_body_timeout(
        daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    body = json.dumps(RESERVE).encode()
    with connect(port) as sock:
        sock.sendall(f"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     "\r\n".encode())
        started = time.monotonic()
        answer = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            if time.monotonic() - started > BODY_S + SLACK_S + 2:
                break
        _, answer = read_until_closed(sock, 2)
        took = time.monotonic() - started
    assert took <= BODY_S + SLACK_S + 0.5, took
    assert answer.startswith(b"HTTP/1.1 408"), answer


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
        daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    body = json.dumps(RESERVE).encode()
    with connect(port) as sock:
        sock.sendall(f"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     "\r\n".encode() + body)
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        # a second request on the same connection still works before the deadline
        time.sleep(IDLE_S / 2)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        took, rest = read_until_closed(sock, IDLE_S + SLACK_S + 2)
    assert rest == b"" and IDLE_S - 0.1 <= took <= IDLE_S + SLACK_S, took


# -- floods -------------------------------------------------------------------------------------

def _normal_client_latencies(port: int, calls: int) -> list[float]:
    """A well-behaved client: one reserve per fresh connection; seconds per call."""
    body = json.dumps(RESERVE).encode()
    took = []
    for _ in range(calls):
        started = time.monotonic()
        status, _, answer = exchange(port, request(body, headers="Content-Type: "
                                                   "application/json\r\n"))
        assert status == 200, answer
        took.append(time.monotonic() - started)
        time.sleep(0.02)
    return took


def _summary(took: list[float]) -> str:
    ordered = sorted(took)
    return (f"median {statistics.median(ordered) * 1000:.1f} ms, "
            f"p95 {ordered[int(len(ordered) * 0.95) - 1] * 1000:.1f} ms, "
            f"max {ordered[-1] * 1000:.1f} ms")


def _limit_files(limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def test_a_flood_of_idle_and_slow_connections_leaves_normal_clients_served(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Under `ulimit -n 256`, 300 silent sockets and 60 that trickle their head: a normal
    client's calls all answer 200, fast. Before the guard the process ran out of descriptors
    and the normal client's connections were never accepted."""
    port = free_port()
    daemon = Daemon(tmp_path, config(port, redis_server.url).replace(
        f"header_timeout_s = {HEADER_S}", "header_timeout_s = 30"),
        preexec_fn=_limit_files(256))
    flood: list[socket.socket] = []
    stop = threading.Event()
    try:
        wait_healthy(daemon, port)
        baseline = _normal_client_latencies(port, 30)
        for i in range(360):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                continue
            if i % 6 == 0:
                sock.sendall(b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\n")
            flood.append(sock)

        def trickle() -> None:
            while not stop.is_set():
                for sock in flood[::6]:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
                stop.wait(0.5)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        under_flood = _normal_client_latencies(port, 30)
        print(f"\nnormal client alone: {_summary(baseline)}; "
              f"beside 360 idle/slow sockets under ulimit -n 256: {_summary(under_flood)}")
        assert max(under_flood) < 1.0, _summary(under_flood)
        assert daemon.proc.poll() is None
        assert "Traceback" not in daemon.log
        assert "serving at most" in daemon.log      # the cap was fitted to the limit
    finally:
        stop.set()
        for sock in flood:
            sock.close()
        if daemon.proc.poll() is None:
            daemon.stop()


SLOW_BODY_HEAD = (b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{")


class SlowBodies:
    """An attacker holding `count` connections that each send a head promising 100 kB, then
    one body byte a second; a connection the daemon closes is opened again, every round."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.socks: list[socket.socket] = []
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.sendall(SLOW_BODY_HEAD)
            self.socks.append(sock)
        except OSError:
            pass

    def start(self) -> None:
        for _ in range(self.count):
            self._open()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            alive = []
            for sock in self.socks:
                try:
                    sock.send(b" ")
                    alive.append(sock)
                except OSError:
                    sock.close()
            self.socks = alive
            while len(self.socks) < self.count and not self._stop.is_set():
                self.reopened += 1
                self._open()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def _try_reserve(port: int) -> float | None:
    """One reserve on a fresh connection: seconds it took, None if it was not answered 200."""
    body = json.dumps(RESERVE).encode()
    started = time.monotonic()
    try:
        with connect(port, timeout=5) as sock:
            sock.sendall(request(body, headers="Content-Type: application/json\r\n"))
            _, answer = read_until_closed(sock, 5)
    except (OSError, pytest.fail.Exception):
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.1 200") else None


def test_a_flood_of_slow_bodies_leaves_normal_clients_served(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """300 connections trickling a 100 kB body at a byte a second against a cap of 200 (the
    attacker reopens every connection closed): a normal client's reserves all answer 200, fast.
    Without displacing slow bodies the cap stayed full of them and every normal connection was
    closed unanswered until body_timeout_s."""
    port = free_port()
    daemon = Daemon(tmp_path, config(port, redis_server.url).replace(
        f"header_timeout_s = {HEADER_S}", "header_timeout_s = 30").replace(
        f"body_timeout_s = {BODY_S}", "body_timeout_s = 60").replace(
        "[redis]", "max_connections = 200\n\n[redis]"))
    attack = SlowBodies(port, 300)
    try:
        wait_healthy(daemon, port)
        attack.start()
        time.sleep(2.5)           # the bodies fall behind the minimum pace
        took = []
        for _ in range(40):
            took.append(_try_reserve(port))
            time.sleep(0.05)
        served = [t for t in took if t is not None]
        print(f"\nnormal client beside 300 slow bodies (cap 200): {len(served)}/{len(took)} "
              f"served{'; ' + _summary(served) if served else ''}; "
              f"attacker reopened {attack.reopened}")
        assert len(served) == len(took), f"{len(served)}/{len(took)} served"
        assert max(served) < 2.0, _summary(served)   # the attack's timescale: 60 s
        assert daemon.proc.poll() is None
        assert "Traceback" not in daemon.log
    finally:
        attack.stop()
        if daemon.proc.poll() is None:
            daemon.stop()


def test_a_flood_of_huge_prompts_from_one_user_leaves_other_users_counted_fast(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """16 concurrent dry runs of 1 MB prompts that are slow to encode (no spaces), kept up by
    one user, while another user reserves 9,000-character prompts (counted on the same
    threads): the other user's reserves stay fast. Without turns per caller each waited
    behind the whole flood, seconds."""
    port = free_port()
    daemon = Daemon(tmp_path, config(port, redis_server.url))
    huge = json.dumps({**RESERVE, "user": "flood", "input_tokens": None, "dry_run": True,
                       "prompt": "ab1" * 333_000}).encode()
    normal = {**RESERVE, "user": "u2", "input_tokens": None, "prompt": "word " * 1800}
    stop = threading.Event()
    flooded: list[int] = []

    def flood() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                status, _, _ = exchange(port, request(huge))
                flooded.append(status)

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(16)]
    try:
        wait_healthy(daemon, port)
        for thread in flooders:
            thread.start()
        time.sleep(2.0)            # the flood's prompts queue up for the counting threads
        took = []
        for _ in range(30):
            started = time.monotonic()
            status, _, answer = exchange(port, request(json.dumps(normal).encode()))
            assert status == 200, answer
            took.append(time.monotonic() - started)
            time.sleep(0.05)
        ordered = sorted(took)
        print(f"\n9,000-char prompts beside 16 concurrent 1 MB prompts of another user: "
              f"{_summary(took)}, p99 {ordered[int(len(ordered) * 0.99) - 1] * 1000:.1f} ms; "
              f"flood answers {sorted(set(flooded))}, {len(flooded)} in all")
        assert statistics.median(took) < 0.1, _summary(took)
        assert ordered[-2] < 0.5, _summary(took)      # all but one far below the flood's seconds
        assert set(flooded) <= {200, 429}, set(flooded)
        assert "Traceback" not in daemon.log
    finally:
        stop.set()
        for thread in flooders:
            thread.join(30)
        daemon.stop()


# -- bad bytes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "status", "code"), [
    ("Content-Encoding: gzip\r\n", 400, "invalid_body"),
    ("Content-Encoding: deflate\r\n", 400, "invalid_body"),
    ("Content-Encoding: compress\r\n", 415, "unsupported_media_type"),
    ("Content-Encoding: x-unknown\r\n", 415, "unsupported_media_type"),
    ("Content-Type: text/plain\r\n", 415, "unsupported_media_type"),
    ("Content-Type: application/x-www-form-urlencoded\r\n", 415, "unsupported_media_type"),
])
def test_bodies_in_a_bad_coding_or_media_type_answer_4xx(
        daemon: tuple[Daemon, int], headers: str, status: int, code: str) -> None:
    daemon_proc, port = daemon
    got, _, body = exchange(port, request(json.dumps(RESERVE).encode(), headers=headers))
    assert got == status, body
    assert_error_shape(body, code)
    assert "Traceback" not in daemon_proc.log and '"level":"error"' not in daemon_proc.log


def test_a_coding_aiohttp_cannot_decode_is_refused_before_the_handler(
        daemon: tuple[Daemon, int]) -> None:
    """brotli (without the Brotli package): aiohttp's parser refuses it with a plain 400 before
    any handler runs; never read as plain JSON, never a 500."""
    daemon_proc, port = daemon
    got, _, _ = exchange(port, request(json.dumps(RESERVE).encode(),
                                       headers="Content-Encoding: br\r\n"))
    assert got in (400, 415)
    assert "Traceback" not in daemon_proc.log


def test_a_real_gzip_body_is_read(daemon: tuple[Daemon, int]) -> None:
    import gzip
    _, port = daemon
    got, _, body = exchange(port, request(gzip.compress(json.dumps(RESERVE).encode()),
                                          headers="Content-Encoding: gzip\r\n"))
    assert got == 200, body


def test_bearer_bytes_that_are_not_utf8_answer_401(
        tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    daemon = Daemon(tmp_path, config(port, redis_server.url).replace(
        "[server]", '[server]\nservice_tokens = ["s3cret-0123456789abc"]'))
    try:
        wait_healthy(daemon, port)
        body = json.dumps(RESERVE).encode()
        for token in (b"s3cr\xe9t", b"\xff\xfe", b"s3cret\x80"):
            raw = request(body).replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer "
                                        + token + b"\r\n")
            status, _, answer = exchange(port, raw)
            assert status == 401, answer
            assert_error_shape(answer, "invalid_service_token")
        good = request(body).replace(
            b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer s3cret-0123456789abc\r\n")
        assert exchange(port, good)[0] == 200
        assert "Traceback" not in daemon.log
    finally:
        daemon.stop()


def test_admin_bearer_bytes_that_are_not_utf8_answer_401(
        tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    daemon = Daemon(tmp_path, config(port, redis_server.url).replace(
        "[server]", '[server]\nadmin_tokens = ["adm1n-s3cret-0123456789"]'))
    try:
        wait_healthy(daemon, port)
        for token in (b"adm1n-s3cret-0123456789\xe9", b"\xff\xfe", b"adm1n-s3cret-0123456789\x80"):
            raw = request(b"", method="GET", path="/v1/admin/blocks").replace(
                b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer " + token + b"\r\n")
            status, _, answer = exchange(port, raw)
            assert status == 401, answer
            assert_error_shape(answer, "invalid_admin_token")
        assert "Traceback" not in daemon.log
    finally:
        daemon.stop()


GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)),   # a TLS hello
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /v1/reserve HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/reserve HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"\x00\x00\x00\x00\r\n\r\n",
    b"POST /v1/reserve HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


def test_protocol_garbage_is_refused_quietly(daemon: tuple[Daemon, int]) -> None:
    daemon_proc, port = daemon
    for _ in range(5):
        for raw in GARBAGE:
            with connect(port) as sock:
                try:
                    sock.sendall(raw)
                    _, answer = read_until_closed(sock, 5)
                except (BrokenPipeError, ConnectionResetError):
                    answer = b""
            assert answer == b"" or answer[:10] in (b"HTTP/1.1 4", b"HTTP/1.0 4"), answer[:200]
    # still serving, nothing logged as an error, at most a line per 10 s for the lot
    assert exchange(port, request(json.dumps(RESERVE).encode()))[0] == 200
    log = daemon_proc.log
    assert "Traceback" not in log and '"level":"error"' not in log, log
    assert log.count("aiohttp") + log.count("ratelimitd.http.edge") <= 3, log


def test_clients_hanging_up_mid_body_are_one_log_line(daemon: tuple[Daemon, int]) -> None:
    daemon_proc, port = daemon
    for _ in range(30):
        with connect(port) as sock:
            sock.sendall(b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
                         b"{\"user\": \"u")
            time.sleep(0.01)
    time.sleep(0.5)
    assert exchange(port, request(json.dumps(RESERVE).encode()))[0] == 200
    log = daemon_proc.log
    assert "Traceback" not in log and '"level":"error"' not in log, log
    assert log.count("hung up") <= 2, log
