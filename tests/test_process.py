"""The daemon's process around the engine: its embedded redis-server killed, itself killed,
SIGHUP, and state directories it cannot use. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support.daemon import (
    RATELIMITD,
    Daemon,
    alive,
    daemons,
    embedded_redis_pids,
    http,
    redis_pid,
    wait_healthy,
)
from tests.support.redis_servers import free_port, redis_binary

__all__ = ["daemons", "embedded_redis_pids"]  # fixtures

RESERVE = {"user": "u1", "tier": "t", "model": "gpt-4o", "input_tokens": 100,
           "max_output_tokens": 100}


def config_text(port: int, data_dir: Path) -> str:
    return f'''
[server]
listen = ["127.0.0.1:{port}"]

[redis]
data_dir = "{data_dir}"

[tiers.t]
requests_per_minute = 1000
tokens_per_day = 100000
'''


def gone(pid: int) -> bool:
    """Dead and reaped: no process, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def new_redis_pid(data_dir: Path, old: int) -> int | None:
    try:
        pid = redis_pid(data_dir)
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError, OSError):
        return None
    return pid if pid != old else None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_killed_embedded_redis_is_restarted_and_healthz_tells(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int],
        workers: str) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir), "--workers", workers)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    first = redis_pid(data_dir)
    embedded_redis_pids.append(first)
    assert http(port, "POST", "/v1/reserve", RESERVE)[0] == 200

    os.kill(first, signal.SIGKILL)
    # /healthz says so while it is down (the first restart waits 0.25 s)
    saw_down = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not saw_down:
        status, body = http(port, "GET", "/healthz")
        saw_down = status == 503 and body["status"] == "embedded_redis_down"
    assert saw_down
    wait_for(lambda: new_redis_pid(data_dir, first) is not None, 15, "a new redis-server")
    second = redis_pid(data_dir)
    embedded_redis_pids.append(second)
    assert gone(first), "the killed redis-server was left a zombie"
    wait_for(lambda: http(port, "GET", "/healthz")[0] == 200, 10, "/healthz ok again")
    wait_for(lambda: http(port, "POST", "/v1/reserve", RESERVE)[0] == 200, 10, "reserves again")
    # the append-only file kept the spend of before the crash
    status, body = http(port, "POST", "/v1/reserve", RESERVE)
    tokens = next(lim for lim in body["limits"] if lim["name"] == "tokens_per_day")
    assert tokens["remaining"] <= 100_000 - 3 * 200, body
    assert "restarting it" in daemon.log
    assert daemon.stop() == 0, daemon.log
    assert not alive(second)


def test_an_embedded_redis_that_keeps_dying_stops_the_daemon_with_status_1(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir))
    daemons.append(daemon)
    wait_healthy(daemon, port)
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while daemon.proc.poll() is None:
        assert time.monotonic() < deadline, daemon.log
        try:
            pid = redis_pid(data_dir)
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError, OSError):
            time.sleep(0.05)
            continue
        embedded_redis_pids.append(pid)
        if pid not in killed:
            killed.add(pid)
            os.kill(pid, signal.SIGKILL)
    assert daemon.wait_exit() == 1, daemon.log
    assert "giving up" in daemon.log
    assert len(killed) == 6  # the first and 5 restarts
    assert all(gone(pid) for pid in killed)
    assert "Traceback" not in daemon.log


def test_a_killed_daemon_takes_its_redis_along_and_restarts_cleanly(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    first = Daemon(tmp_path, config_text(port, data_dir), "--workers", "2", name="first")
    daemons.append(first)
    wait_healthy(first, port)
    redis_1 = redis_pid(data_dir)
    embedded_redis_pids.append(redis_1)
    workers = first.listening_pids()
    assert http(port, "POST", "/v1/reserve", RESERVE)[0] == 200
    first.proc.kill()
    first.wait_exit()
    wait_for(lambda: not alive(redis_1), 10, "the orphaned redis-server to stop")
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to stop")

    second = Daemon(tmp_path, config_text(port, data_dir), name="second")
    daemons.append(second)
    wait_healthy(second, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    status, body = http(port, "POST", "/v1/reserve", RESERVE)
    assert status == 200, body
    rpm = next(lim for lim in body["limits"] if lim["name"] == "requests_per_minute")
    assert rpm["remaining"] == 998                      # the first daemon's call counted
    assert second.stop() == 0


def test_a_stale_redis_on_the_socket_is_replaced_safely(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    """A redis-server left on the state directory's socket by a daemon that could not stop it
    (an older build, PDEATHSIG unavailable): shut down, its data kept, a new one started."""
    port, data_dir = free_port(), tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    sock = data_dir / "redis.sock"
    stale = subprocess.Popen([redis_binary(), "--port", "0", "--unixsocket", str(sock),
                              "--unixsocketperm", "600", "--dir", str(data_dir),
                              "--appendonly", "yes", "--save", ""],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    embedded_redis_pids.append(stale.pid)
    try:
        wait_for(lambda: sock.exists(), 10, "the stale redis-server")
        client = redis.Redis(unix_socket_path=str(sock))
        wait_for(lambda: bool(client.ping()), 10, "the stale redis-server answering")
        client.set("kept", "yes")
        client.close()
        daemon = Daemon(tmp_path, config_text(port, data_dir))
        daemons.append(daemon)
        wait_healthy(daemon, port)
        assert stale.wait(10) == 0                      # asked to SHUTDOWN: a clean exit
        embedded_redis_pids.append(redis_pid(data_dir))
        assert redis_pid(data_dir) != stale.pid
        client = redis.Redis(unix_socket_path=str(sock))
        assert client.get("kept") == b"yes"
        client.close()
        assert daemon.stop() == 0
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reloads_with_a_log_line_and_keeps_serving(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int],
        workers: str) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir), "--workers", workers)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    daemon.proc.send_signal(signal.SIGHUP)
    for pid in daemon.listening_pids():
        if pid != daemon.proc.pid:
            os.kill(pid, signal.SIGHUP)
    time.sleep(0.5)
    assert daemon.proc.poll() is None, daemon.log
    assert http(port, "POST", "/v1/reserve", RESERVE)[0] == 200
    assert "reloaded" in daemon.log
    assert daemon.stop() == 0


def _serve_with(tmp_path: Path, data_dir: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n'
                      f'[redis]\ndata_dir = "{data_dir}"\n')
    return subprocess.run([str(RATELIMITD), "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def _read_only_directory(tmp_path: Path) -> str:
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        return str(ro)
    # root writes anywhere a mode allows nothing; sysfs refuses new files to everyone
    return "/sys/kernel"


@pytest.mark.parametrize("case", ["read_only", "not_a_directory", "parent_is_a_file",
                                  "read_only_missing_child"])
def test_an_unusable_state_directory_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    path = {"read_only": _read_only_directory(tmp_path),
            "not_a_directory": str(a_file),
            "parent_is_a_file": str(a_file / "state"),
            "read_only_missing_child": _read_only_directory(tmp_path) + "/ratelimitd"}[case]
    done = _serve_with(tmp_path, path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ratelimitd: ")]
    assert len(errors) == 1, done.stderr
    assert path in errors[0] and "data_dir" in errors[0], errors[0]
