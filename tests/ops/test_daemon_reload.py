"""SIGHUP on a real daemon under load: a valid changed file is in use by the next reserve (in
every worker), an invalid one is logged and the old configuration kept, and no request of
the load fails meanwhile."""

from __future__ import annotations

import itertools
import signal
import threading
import time
import urllib.error
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


def config_text(port: int, data_dir: Path, per_minute: int) -> str:
    return (f'[server]\nlisten = ["127.0.0.1:{port}"]\naccess_log = false\n'
            f'[redis]\ndata_dir = "{data_dir}"\n'
            f'[tiers.t]\nrequests_per_minute = {per_minute}\n')


def allowed_in_a_row(port: int, user: str, tries: int) -> int:
    """How many reserves of a fresh user pass before the first denial."""
    for n in range(tries):
        status, answer = http(port, "POST", "/v1/reserve", {"user": user, "tier": "t",
                                                            "model": "gpt-4o", "input_tokens": 1,
                                                            "max_output_tokens": 1})
        if status == 429:
            return n
        assert status == 200, answer
    return tries


class Load:
    """Threads sending reserves of fresh users (never denied) until stopped; every answer
    that is not a 200, and every connection error, is kept."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.failures: list[object] = []
        self.done = 0
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            body = {"user": f"load-{next(self._ids)}", "tier": "t", "model": "gpt-4o",
                    "input_tokens": 1, "max_output_tokens": 1}
            try:
                status, answer = http(self.port, "POST", "/v1/reserve", body)
            except (urllib.error.URLError, OSError) as exc:
                self.failures.append(exc)
                continue
            if status != 200:
                self.failures.append((status, answer))
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def wait_log(daemon: Daemon, text: str, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while daemon.log.count(text) < count:
        assert time.monotonic() < deadline, f"{count} x {text!r} not logged:\n{daemon.log}"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_swaps_a_valid_file_and_keeps_the_old_one_for_an_invalid_file_under_load(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int],
        workers: str) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir, 2), "--workers", workers)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    assert allowed_in_a_row(port, "before", 10) == 2
    load = Load(port)
    try:
        daemon.config_path.write_text(config_text(port, data_dir, 5))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_log(daemon, "reloaded", int(workers))
        for user in ("after-1", "after-2", "after-3"):  # whichever worker answers
            assert allowed_in_a_row(port, user, 10) == 5
        daemon.config_path.write_text("[tiers.t]\nrequests_per_minute = -3\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_log(daemon, "keeping the configuration in use", 1)
        for user in ("invalid-1", "invalid-2", "invalid-3"):
            assert allowed_in_a_row(port, user, 10) == 5
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.done > 20 and not load.failures, (load.done, load.failures[:5])
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log
