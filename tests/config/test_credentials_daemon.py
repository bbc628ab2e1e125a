"""Secrets from systemd credentials, as the install guide sets them up: a real `ratelimitd
serve` started with a $CREDENTIALS_DIRECTORY, and `ratelimitd check-config` on references it
cannot resolve."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import RATELIMITD, Daemon, daemons, http, wait_healthy
from tests.support.redis_servers import free_port

__all__ = ["daemons"]  # fixture

SERVICE_TOKEN = secrets.token_hex(32)
ADMIN_TOKEN = secrets.token_hex(32)
CONFIG = '''
[server]
listen = ["127.0.0.1:{port}"]
service_tokens = ["credential:service_tokens"]
admin_tokens = ["credential:admin_tokens"]

[keys]
pepper = "credential:key_pepper"

[redis]
data_dir = "{data_dir}"

[tiers.t]
requests_per_minute = 1000
'''
RESERVE = {"user": "u1", "tier": "t", "model": "gpt-4o", "input_tokens": 10,
           "max_output_tokens": 10}


def credentials(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700)
    (directory / "service_tokens").write_text(f"# gateways\n{SERVICE_TOKEN}\n")
    (directory / "admin_tokens").write_text(f"{ADMIN_TOKEN}\n")
    (directory / "key_pepper").write_text(secrets.token_hex(32) + "\n")
    return directory


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CREDENTIALS_DIRECTORY", "RATELIMITD_KEY_PEPPER")}
    return {**env, **extra}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_daemon_serves_the_tokens_of_its_credentials_not_their_names(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    port = free_port()
    daemon = Daemon(tmp_path, CONFIG.format(port=port, data_dir=tmp_path / "data"),
                    env=environment(CREDENTIALS_DIRECTORY=str(credentials(tmp_path))))
    daemons.append(daemon)
    wait_healthy(daemon, port)

    status, answer = http(port, "POST", "/v1/reserve", RESERVE,
                          bearer("credential:service_tokens"))
    assert (status, answer["error"]["code"]) == (401, "invalid_service_token"), answer
    status, answer = http(port, "POST", "/v1/reserve", RESERVE, bearer(SERVICE_TOKEN))
    assert status == 200 and answer["allowed"] is True, answer

    key = {"user": "u1", "tier": "t"}
    status, answer = http(port, "POST", "/v1/admin/keys", key, bearer("credential:admin_tokens"))
    assert (status, answer["error"]["code"]) == (401, "invalid_admin_token"), answer
    status, answer = http(port, "POST", "/v1/admin/keys", key, bearer(ADMIN_TOKEN))
    assert status == 201 and answer["api_key"].startswith("rlk_"), answer  # the pepper is read
    assert daemon.stop() == 0
    for secret in (SERVICE_TOKEN, ADMIN_TOKEN):
        assert secret not in daemon.log


def check_config(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RATELIMITD), "check-config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("prepare", "says"), [
    (lambda d: d.rename(d.with_name("gone")), "CREDENTIALS_DIRECTORY is not set"),
    (lambda d: (d / "admin_tokens").unlink(), "cannot read"),
    (lambda d: (d / "admin_tokens").write_text(""), "is empty"),
    (lambda d: (d / "admin_tokens").write_text("# none yet\n"), "holds no token"),
    (lambda d: (d / "admin_tokens").write_text("short-token\n"), "shorter than 16 bytes")],
    ids=["no-directory", "missing-file", "empty-file", "only-comments", "short-token"])
def test_check_config_and_serve_refuse_a_credential_they_cannot_resolve(
        tmp_path: Path, daemons: list[Daemon], prepare: object, says: str) -> None:
    directory = credentials(tmp_path)
    port = free_port()
    config = tmp_path / "ratelimitd.toml"
    config.write_text(CONFIG.format(port=port, data_dir=tmp_path / "data"))
    assert check_config(config, environment(CREDENTIALS_DIRECTORY=str(directory))
                        ).returncode == 0
    prepare(directory)  # type: ignore[operator]
    env = environment(CREDENTIALS_DIRECTORY=str(directory)) if directory.exists() else (
        environment())
    done = check_config(config, env)
    assert done.returncode == 2, done
    # the key and its line (admin_tokens is on line 5; with no directory, line 4 is first)
    assert "server.admin_tokens.0" in done.stderr and "(line 5)" in done.stderr, done.stderr
    assert says in done.stderr, done.stderr
    assert ADMIN_TOKEN not in done.stderr and SERVICE_TOKEN not in done.stderr

    daemon = Daemon(tmp_path, config.read_text(), env=env, name="refused")
    daemons.append(daemon)
    assert daemon.wait_exit(30) == 2
    assert says in daemon.log and "server.admin_tokens.0" in daemon.log, daemon.log


@pytest.mark.parametrize("reference", ["file:/etc/ratelimitd/admin", "vault:admin",
                                       "Credential:admin_tokens", "ENV:ADMIN"])
def test_check_config_refuses_an_unknown_reference(tmp_path: Path, reference: str) -> None:
    config = tmp_path / "ratelimitd.toml"
    config.write_text(f'[server]\nadmin_tokens = ["{reference}"]\n')
    done = check_config(config, environment())
    assert done.returncode == 2, done
    prefix = reference.partition(":")[0]
    assert (f"server.admin_tokens.0: starts with '{prefix}:', which is not a reference"
            in done.stderr and "(line 2)" in done.stderr), done.stderr
    assert reference not in done.stderr
