"""The systemd notify protocol from a real daemon, over a real AF_UNIX datagram socket given
as $NOTIFY_SOCKET: READY=1 once it serves, WATCHDOG=1 every half WATCHDOG_USEC, STOPPING=1 on
SIGTERM; with --workers 2 the supervisor speaks for its workers."""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import (
    Daemon,
    daemons,
    embedded_redis_pids,
    http,
    redis_pid,
    wait_healthy,
)
from tests.support.redis_servers import free_port

__all__ = ["daemons", "embedded_redis_pids"]  # fixtures

RESERVE = {"user": "u1", "tier": "t", "model": "gpt-4o", "input_tokens": 10,
           "max_output_tokens": 10}


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def received(sock: socket.socket, within_s: float) -> list[tuple[float, str]]:
    """(arrival time, datagram) for every datagram in the next within_s seconds."""
    got, deadline = [], time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            got.append((time.monotonic(), sock.recv(4096).decode()))
    return got


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_watchdog_and_stopping_over_a_real_notify_socket(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int],
        notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, workers: str) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    daemon = Daemon(tmp_path, f'[server]\nlisten = ["127.0.0.1:{port}"]\n[redis]\n'
                    f'data_dir = "{data_dir}"\n[tiers.t]\nrequests_per_minute = 100\n',
                    "--workers", workers)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    first = received(notify_socket, 4.0)
    messages = [m for _, m in first]
    ready = [i for i, m in enumerate(messages) if "READY=1" in m.split("\n")]
    assert len(ready) == 1, messages
    # the library is loaded by then: a reserve needs no load
    assert http(port, "POST", "/v1/reserve", RESERVE)[0] == 200
    pings = [t for t, m in first if m == "WATCHDOG=1"]
    assert len(pings) >= 2, messages
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.5 <= gap <= 1.6 for gap in gaps), gaps
    daemon.proc.send_signal(signal.SIGTERM)
    last = [m for _, m in received(notify_socket, 1.5)]
    assert daemon.wait_exit() == 0, daemon.log
    assert any(m.startswith("STOPPING=1") for m in last), last
    assert not any("READY=1" in m for m in last)
