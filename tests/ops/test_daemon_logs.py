"""A real `ratelimitd serve`: its stderr is JSON lines, every answer carries X-Request-Id,
the access log names it (and can be switched off), and no secret reaches the log."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon, daemons, embedded_redis_pids, redis_pid, wait_healthy
from tests.support.redis_servers import free_port

__all__ = ["daemons", "embedded_redis_pids"]  # fixtures

TOKEN = "svc-token-that-must-never-be-logged-0123456789"
RESERVE = {"user": "u1", "tier": "t", "model": "gpt-4o", "input_tokens": 100,
           "max_output_tokens": 100}


def config_text(port: int, data_dir: Path, access_log: bool = True) -> str:
    return f'''
[server]
listen = ["127.0.0.1:{port}"]
service_tokens = ["{TOKEN}"]
access_log = {"true" if access_log else "false"}

[redis]
data_dir = "{data_dir}"

[tiers.t]
requests_per_minute = 1000
'''


def post(port: int, path: str, body: Any, request_id: str | None = None,
         token: str = TOKEN) -> tuple[int, dict[str, Any], str]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                     data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers["X-Request-Id"]
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers["X-Request-Id"]


def json_lines(daemon: Daemon) -> list[dict[str, Any]]:
    lines = [line for line in daemon.log.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line parses, or the test fails


def start(tmp_path: Path, daemons: list[Daemon], pids: list[int], access_log: bool = True,
          *args: str) -> tuple[Daemon, int]:
    port, data_dir = free_port(), tmp_path / "data"
    daemon = Daemon(tmp_path, config_text(port, data_dir, access_log), *args)
    daemons.append(daemon)
    wait_healthy(daemon, port)
    pids.append(redis_pid(data_dir))
    return daemon, port


def test_logs_are_json_lines_with_the_request_id_and_no_secret(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    daemon, port = start(tmp_path, daemons, embedded_redis_pids)
    status, _, given = post(port, "/v1/reserve", RESERVE, request_id="gw-42.abc")
    assert (status, given) == (200, "gw-42.abc")
    status, _, made = post(port, "/v1/reserve", RESERVE, request_id="bad id\twith spaces")
    assert status == 200 and made != "bad id\twith spaces" and len(made) >= 8
    status, body, refused = post(port, "/v1/reserve", RESERVE, token="wrong-" + TOKEN)
    assert status == 401 and body["error"]["code"] == "invalid_service_token" and refused
    status, _, invalid_id = post(port, "/v1/reserve", {**RESERVE, "tier": "nope"})
    assert status == 400 and invalid_id
    time.sleep(0.3)
    assert daemon.stop() == 0
    lines = json_lines(daemon)
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    messages = [line["msg"] for line in lines]
    assert any("starting" in m for m in messages) and any("stopped" in m for m in messages)
    access = {line["request_id"]: line for line in lines if line["logger"] == "ratelimitd.access"}
    for request_id, status in ((given, 200), (made, 200), (refused, 401), (invalid_id, 400)):
        assert access[request_id]["status"] == status
        assert access[request_id]["path"] == "/v1/reserve"
    assert TOKEN not in daemon.log


def test_the_access_log_can_be_switched_off(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    daemon, port = start(tmp_path, daemons, embedded_redis_pids, access_log=False)
    status, _, request_id = post(port, "/v1/reserve", RESERVE)
    assert status == 200 and request_id
    assert daemon.stop() == 0
    lines = json_lines(daemon)
    assert not [line for line in lines if line["logger"] == "ratelimitd.access"]
    assert any("stopped" in line["msg"] for line in lines)


def test_workers_write_their_kept_access_lines_as_they_stop(
        tmp_path: Path, daemons: list[Daemon], embedded_redis_pids: list[int]) -> None:
    """Access lines are kept up to 20 ms before one write: workers stopped at once after
    their answers still write a line for every one."""
    daemon, port = start(tmp_path, daemons, embedded_redis_pids, True, "--workers", "2")
    request_ids = [post(port, "/v1/reserve", RESERVE, request_id=f"gw-{n}")[2]
                   for n in range(20)]
    assert daemon.stop() == 0
    logged = {line.get("request_id") for line in json_lines(daemon)
              if line["logger"] == "ratelimitd.access"}
    assert set(request_ids) <= logged
