"""`ratelimitd keys ...` and `ratelimitd blocks ...` as an operator runs them, against two real
`ratelimitd serve` processes sharing one Redis: what the command line does, the daemons obey
at once; nothing secret reaches a log."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ratelimitd.auth.signatures import sign_request
from tests.cli.test_serve import RATELIMITD, Daemon, http, wait_healthy
from tests.support.keys import PEPPER
from tests.support.redis_servers import RedisServer, free_port

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
[redis]
url = "{url}"
[tiers.t]
requests_per_minute = 100
max_output_tokens = 100
"""


@pytest.fixture
def two_serving(tmp_path: Path, redis_server: RedisServer,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[int], Path, list[Daemon]]]:
    """Two daemons (their ports), the config file they read, and the daemons."""
    monkeypatch.setenv("RATELIMITD_KEY_PEPPER", PEPPER)      # inherited by every process
    redis.Redis.from_url(redis_server.url).flushall()
    ports = [free_port(), free_port()]
    daemons = [Daemon(tmp_path, CONFIG.format(port=port, url=redis_server.url), name=f"d{i}")
               for i, port in enumerate(ports)]
    try:
        for daemon, port in zip(daemons, ports, strict=True):
            wait_healthy(daemon, port)
        yield ports, daemons[0].config_path, daemons
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(10)
            daemon._log.close()


def cli(*args: str, config: Path | None, env: dict[str, str] | None = None
        ) -> tuple[int, Any, str]:
    """Runs `ratelimitd ARGS --config CONFIG`: exit status, its JSON, and stderr."""
    cmd = [str(RATELIMITD), *args] + (["--config", str(config)] if config else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env=env if env is not None else dict(os.environ))
    out = done.stdout if done.returncode == 0 else done.stderr
    try:
        answer = json.loads(out)
    except ValueError:
        answer = None
    return done.returncode, answer, done.stderr


def reserve(port: int, api_key: str, ip: str | None = None, **fields: Any) -> tuple[int, Any]:
    body: dict[str, Any] = {"api_key": api_key, "model": "gpt-4o", "input_tokens": 5, **fields}
    if ip is not None:
        body["attributes"] = {"ip": ip}
    return http(port, "POST", "/v1/reserve", body)


def test_keys_and_blocks_from_the_command_line_rule_both_daemons(
        two_serving: tuple[list[int], Path, list[Daemon]]) -> None:
    ports, config, daemons = two_serving
    status, created, err = cli("keys", "create", "--user", "u1", "--tier", "t", "--org", "acme",
                               "--require-signature", config=config)
    assert status == 0, err
    key, secret, key_id = created["api_key"], created["signing_secret"], created["key_id"]
    secrets_seen = [key, secret, PEPPER]
    for port in ports:
        signature = sign_request(secret, "POST", "/v1/chat/completions", b"{}")
        status, body = reserve(port, key, signature=signature)
        assert status == 200, body
    status, info, err = cli("keys", "show", key_id, config=config)
    assert status == 0 and info["state"] == "active" and info["org"] == "acme", err
    assert key not in json.dumps(info) and secret not in json.dumps(info)

    status, plain, err = cli("keys", "create", "--user", "u2", "--tier", "t", config=config)
    secrets_seen.append(plain["api_key"])
    status, rotated, err = cli("keys", "rotate", plain["key_id"], "--grace-s", "0",
                               config=config)
    assert status == 0 and rotated["old_key_id"] == plain["key_id"], err
    secrets_seen.append(rotated["api_key"])
    for port in ports:
        status, body = reserve(port, plain["api_key"])
        assert (status, body["error"]["code"]) == (403, "key_expired"), body
        status, body = reserve(port, rotated["api_key"], ip="192.0.2.5")
        assert status == 200, body

    status, answer, err = cli("keys", "revoke", rotated["key_id"], config=config)
    assert (status, answer) == (0, {"revoked": True}), err
    start = time.monotonic()
    while reserve(ports[1], rotated["api_key"])[0] == 200:   # drops it through pub/sub
        assert time.monotonic() - start < 1.0
        time.sleep(0.005)
    assert time.monotonic() - start < 1.0
    status, body = reserve(ports[0], rotated["api_key"])
    assert (status, body["error"]["code"]) == (403, "key_revoked")

    status, block, err = cli("blocks", "add", "--scope", "ip", "--id", "192.0.2.5",
                             "--ttl-s", "60", "--reason", "stuffing from here", config=config)
    assert status == 0 and block["id"] == "192.0.2.5", err
    status, listed, err = cli("blocks", "list", config=config)
    assert [b["id"] for b in listed["blocks"]] == ["192.0.2.5"]
    other = cli("keys", "create", "--user", "u3", "--tier", "t", config=config)[1]["api_key"]
    secrets_seen.append(other)
    for port in ports:
        status, body = reserve(port, other, ip="192.0.2.5")
        assert (status, body["error"]["code"]) == (403, "blocked"), body
        assert "stuffing from here" in body["error"]["message"]
    status, answer, err = cli("blocks", "remove", "--scope", "ip", "--id", "192.0.2.5",
                              config=config)
    assert (status, answer) == (0, {"removed": True}), err
    assert reserve(ports[1], other, ip="192.0.2.5")[0] == 200

    for daemon in daemons:
        assert daemon.stop() == 0
        for secret_text in secrets_seen:
            assert secret_text not in daemon.log


def test_command_line_mistakes_answer_json_errors(
        two_serving: tuple[list[int], Path, list[Daemon]], tmp_path: Path) -> None:
    _ports, config, _daemons = two_serving
    status, answer, _ = cli("keys", "show", "key_" + "A" * 17, config=config)
    assert (status, answer["error"]["code"]) == (1, "key_not_found")
    status, answer, _ = cli("keys", "create", "--user", "u1", "--tier", "gold", config=config)
    assert status == 1 and answer["error"]["message"].startswith("tier:")
    status, answer, _ = cli("blocks", "add", "--scope", "global", "--id", "*", "--ttl-s", "9",
                            "--reason", "r", config=config)
    assert (status, answer["error"]["code"]) == (1, "invalid_request")
    no_pepper = {k: v for k, v in os.environ.items() if k != "RATELIMITD_KEY_PEPPER"}
    status, _answer, err = cli("keys", "create", "--user", "u1", "--tier", "t", config=config,
                               env=no_pepper)
    assert status == 2 and "needs the daemons' key pepper" in err
    status, answer, _ = cli("blocks", "list", config=config, env=no_pepper)
    assert status == 0 and answer == {"blocks": []}              # blocks need no pepper
    dead = tmp_path / "dead.toml"
    dead.write_text(f'[redis]\nurl = "redis://127.0.0.1:{free_port()}/0"\n')
    status, answer, _ = cli("blocks", "list", config=dead)
    assert (status, answer["error"]["code"]) == (1, "backend_unavailable")
    bad = tmp_path / "bad.toml"
    bad.write_text("[keys]\nmax_age_days = -1\n")
    status, _answer, err = cli("keys", "show", "key_x", config=bad)
    assert status == 2 and "max_age_days" in err
    short = {**os.environ, "RATELIMITD_KEY_PEPPER": "short"}
    status, _answer, err = cli("keys", "show", "key_x", config=config, env=short)
    assert status == 2 and "pepper" in err
