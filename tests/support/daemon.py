"""A real `ratelimitd serve` process for the tests, and plain-HTTP helpers to talk to it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

RATELIMITD = Path(sys.executable).parent / "ratelimitd"
STOP_WITHIN_S = 10


class Daemon:
    """One `ratelimitd serve` process; its log (stderr) goes to a file."""

    def __init__(self, tmp_path: Path, config: str, *args: str, name: str = "d",
                 preexec_fn: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        """`command`: run this instead of `ratelimitd serve --config` of `config`."""
        self.config_path = tmp_path / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = tmp_path / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command or [str(RATELIMITD), "serve", "--config",
                                                 str(self.config_path), *args],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                                     env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = STOP_WITHIN_S) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def listening_pids(self) -> set[int]:
        return {int(p) for p in re.findall(r"listening on \S+ \(pid (\d+)\)", self.log)}


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Started daemons; any still running at the end is killed, by its own pid."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
        daemon._log.close()


def redis_pid(data_dir: Path) -> int:
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=2)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


@pytest.fixture
def embedded_redis_pids() -> Iterator[list[int]]:
    """Embedded redis-servers seen by a test: killed (by pid) if a failed test left one."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie no one has reaped yet is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def http(port: int, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_healthy(daemon: Daemon, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert daemon.proc.poll() is None, f"daemon exited early:\n{daemon.log}"
        try:
            if http(port, "GET", "/healthz") == (200, {"status": "ok"}):
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"no /healthz within {timeout} s:\n{daemon.log}"
        time.sleep(0.05)


