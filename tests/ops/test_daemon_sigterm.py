"""SIGTERM on a real daemon under load: no request that reached it is cut (a connection
refused after the listeners closed is the only failure allowed), the reservations it granted
are in the embedded Redis's append-only file, and it exits 0 within 10 s."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
from pathlib import Path

import pytest
import redis

from tests.ops.test_daemon_reload import Load, config_text
from tests.support.daemon import (
    Daemon,
    alive,
    daemons,
    embedded_redis_pids,
    redis_pid,
    wait_healthy,
)
from tests.support.redis_servers import free_port, redis_binary

__all__ = ["daemons", "embedded_redis_pids"]  # fixtures


def refused(failure: object) -> bool:
    """Refused before the daemon accepted the connection: refused once the listeners are
    closed, or reset in a closing listener's accept queue (the kernel resets what was queued
    but not accepted; the client sees a broken pipe or a reset). A client cannot tell such a
    reset from a cut, so the test also checks below that every grant the daemon made reached
    Redis and none was lost."""
    reason = failure.reason if isinstance(failure, urllib.error.URLError) else failure
    return isinstance(reason, ConnectionRefusedError | BrokenPipeError | ConnectionResetError)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_under_load_cuts_no_request_and_exits_within_10_s(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int],
        workers: str) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir, 1000), "--workers", workers)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    store_pid = redis_pid(data_dir)
    embedded_redis_pids.append(store_pid)
    load = Load(port, threads=4)
    time.sleep(1.0)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        status = daemon.wait_exit()
    finally:
        load.stop()
    assert status == 0, daemon.log
    assert time.monotonic() - started < 10
    assert not alive(store_pid)
    cut = [f for f in load.failures if not refused(f)]
    assert load.done > 20 and not cut, (load.done, cut[:5])
    # every grant answered 200 was written before the Redis stopped: it is in the AOF
    answered, check_port = load.done, free_port()
    proc = subprocess.Popen([redis_binary(), "--port", str(check_port), "--dir", str(data_dir),
                             "--appendonly", "yes", "--save", ""],
                            stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=check_port)
        deadline = time.monotonic() + 10
        while True:
            try:
                keys = client.dbsize()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert keys >= answered  # at least a reservation record per grant
    finally:
        proc.terminate()
        proc.wait(10)
