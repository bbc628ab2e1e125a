"""The command line as an operator runs it: each command needs only what it uses (Redis and
the pepper for `keys`, Redis for `blocks`, the daemon's URL and an admin token for `usage`),
from flags, the environment or a configuration; what is missing is named; times are ISO 8601
UTC; `check-config` reports every mistake of a file in one run. Real Redis, real processes."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from ratelimitd import __version__
from tests.support.daemon import RATELIMITD, Daemon, daemons, wait_healthy
from tests.support.keys import PEPPER
from tests.support.redis_servers import RedisServer, free_port

__all__ = ["daemons"]  # fixture

ROOT = Path(__file__).resolve().parents[2]
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def operator_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A shell with none of the daemon's settings: no config, pepper, credentials or state."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RATELIMITD_") and k not in ("CREDENTIALS_DIRECTORY",
                                                            "STATE_DIRECTORY")}
    return {**env, "HOME": str(tmp_path), **extra}


def ratelimitd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RATELIMITD), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def parse_iso(text: str) -> float:
    assert ISO_UTC.fullmatch(text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def test_keys_create_with_only_a_redis_url_and_the_pepper_variable(
        tmp_path: Path, redis_server: RedisServer) -> None:
    env = operator_env(tmp_path, RATELIMITD_KEY_PEPPER=PEPPER)
    done = ratelimitd(env, "keys", "create", "--user", "u", "--tier", "free",
                      "--expires-in-days", "30", "--redis-url", redis_server.url)
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert created["api_key"].startswith("rlk_") and "expires_at_ms" not in created
    assert abs(parse_iso(created["expires_at"]) - (time.time() + 30 * 86_400)) < 120

    shown = ratelimitd(env, "keys", "show", created["key_id"], "--redis-url", redis_server.url)
    assert shown.returncode == 0, shown.stderr
    key = json.loads(shown.stdout)
    assert abs(parse_iso(key["created_at"]) - time.time()) < 120
    assert key["expires_at"] == created["expires_at"] and key["revoked_at"] is None


def test_keys_and_blocks_with_only_a_config_whose_other_secrets_are_out_of_reach(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """The daemon's file names credentials this shell cannot read: keys and blocks do not
    need them."""
    config = tmp_path / "ratelimitd.toml"
    config.write_text(f'''
[server]
service_tokens = ["credential:service_tokens"]
admin_tokens = ["credential:admin_tokens"]
[redis]
url = "{redis_server.url}"
[keys]
pepper = "env:OPS_PEPPER"
''')
    env = operator_env(tmp_path, OPS_PEPPER=PEPPER)
    done = ratelimitd(env, "keys", "create", "--user", "u", "--tier", "free", "--config",
                      str(config))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["api_key"].startswith("rlk_")

    env_only = operator_env(tmp_path, RATELIMITD_CONFIG=str(config))  # no pepper: blocks only
    done = ratelimitd(env_only, "blocks", "add", "--scope", "user", "--id", "u9", "--ttl-s",
                      "600", "--reason", "chargeback")
    assert done.returncode == 0, done.stderr
    block = json.loads(done.stdout)
    assert abs(parse_iso(block["expires_at"]) - (time.time() + 600)) < 120
    listed = json.loads(ratelimitd(env_only, "blocks", "list").stdout)
    assert [b["id"] for b in listed["blocks"]] == ["u9"]
    assert redis.Redis.from_url(redis_server.url).dbsize() > 0


def test_what_is_missing_is_named(tmp_path: Path, redis_server: RedisServer) -> None:
    env = operator_env(tmp_path)
    no_pepper = ratelimitd(env, "keys", "create", "--user", "u", "--tier", "free",
                           "--redis-url", redis_server.url)
    assert no_pepper.returncode == 2
    assert "needs the daemons' key pepper" in no_pepper.stderr
    assert "RATELIMITD_KEY_PEPPER" in no_pepper.stderr and "--config" in no_pepper.stderr

    no_redis = ratelimitd({**env, "RATELIMITD_KEY_PEPPER": PEPPER}, "keys", "create",
                          "--user", "u", "--tier", "free")
    assert no_redis.returncode == 2
    assert "needs the daemons' Redis" in no_redis.stderr and "--redis-url" in no_redis.stderr

    bad_url = ratelimitd(env, "blocks", "list", "--redis-url", "http://127.0.0.1:6379")
    assert bad_url.returncode == 2 and "--redis-url" in bad_url.stderr

    no_token = ratelimitd(env, "usage", "user", "u1")
    assert no_token.returncode == 2
    assert "admin token is needed" in no_token.stderr and "--admin-token" in no_token.stderr


def test_usage_with_only_the_daemons_config(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The URL from the file's listen address, the admin token from its env: reference."""
    port = free_port()
    admin = secrets.token_hex(32)
    daemon = Daemon(tmp_path, f'''
[server]
listen = ["127.0.0.1:{port}"]
admin_tokens = ["env:OPS_ADMIN"]
[redis]
data_dir = "{tmp_path / 'data'}"
''', env=operator_env(tmp_path, OPS_ADMIN=admin))
    daemons.append(daemon)
    wait_healthy(daemon, port)
    env = operator_env(tmp_path, OPS_ADMIN=admin)
    done = ratelimitd(env, "usage", "user", "u1", "--tier", "free", "--config",
                      str(daemon.config_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "user u1" and "requests_per_minute" in done.stdout
    assert admin not in done.stdout + done.stderr

    wrong = ratelimitd(env, "usage", "user", "u1", "--config", str(daemon.config_path),
                       "--admin-token", "wrong-token-0000000")
    assert wrong.returncode == 1 and "401 invalid_admin_token" in wrong.stderr


BAD_CONFIG = """\
[server]
listen = ["nope"]
max_body_bytes = "x"
bogus = 1

[redis]
mode = "weird"
timeout_ms = 0

[tiers.free]
requests_per_minute = -1
max_concurrent = "a"

[[tiers.free.limits]]
name = "x"
scope = "planet"
metric = "requests"
window = "60s"
limit = 10

[anomaly]
action = "explode"
block_s = 0
"""


def test_check_config_reports_every_mistake_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(BAD_CONFIG)
    done = ratelimitd(operator_env(tmp_path), "check-config", str(config))
    assert done.returncode == 2
    found = [(m.group(1), int(m.group(2)))
             for m in re.finditer(r"bad\.toml: (\S+): .*\(line (\d+)\)$", done.stderr, re.M)]
    assert found == [
        ("server.listen.0", 2), ("server.max_body_bytes", 3), ("server.bogus", 4),
        ("redis.mode", 7), ("redis.timeout_ms", 8), ("tiers.free.requests_per_minute", 11),
        ("tiers.free.max_concurrent", 12), ("tiers.free.limits[0].scope", 16),
        ("anomaly.action", 22), ("anomaly.block_s", 23)], done.stderr
    assert all(line.startswith("ratelimitd: ") for line in done.stderr.splitlines())


def test_the_readme_set_up_puts_ratelimitd_on_path(tmp_path: Path) -> None:
    """`export PATH="$PWD/.venv/bin:$PATH"` in the checkout, then `ratelimitd` anywhere."""
    assert (ROOT / ".venv" / "bin" / "ratelimitd").exists(), "run `bash scripts/setup.sh`"
    script = f'cd {ROOT} && export PATH="$PWD/.venv/bin:$PATH" && cd {tmp_path} && ' \
             'command -v ratelimitd && ratelimitd --version'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(ROOT / ".venv" / "bin" / "ratelimitd"),
                                   "ratelimitd", __version__]


@pytest.mark.parametrize("ms", [0, 1_804_250_200_721])
def test_times_read_as_iso_utc(ms: int) -> None:
    from ratelimitd.cli.admin import readable_times
    shown = readable_times({"key": {"expires_at_ms": ms, "revoked_at_ms": None},
                            "blocks": [{"expires_at_ms": ms}], "grace_s": 5})
    assert parse_iso(shown["key"]["expires_at"]) == ms // 1000
    assert shown["key"]["revoked_at"] is None and shown["grace_s"] == 5
    assert shown["blocks"][0]["expires_at"] == shown["key"]["expires_at"]
