"""docs/operations.md, "Install as a systemd service", end to end as far as a machine without
systemd as PID 1 allows: the guide's own commands run into a temporary root (its absolute
paths moved under it; apt-get and systemctl only logged; the virtualenv's `pip install` logged
and its `ratelimitd` the one under test), `systemd-analyze verify` checks the installed unit
against that root, and the daemon starts as the unit starts it (ExecStart, Environment=,
StateDirectory=, RuntimeDirectory=, LoadCredential= copied to $CREDENTIALS_DIRECTORY,
NOTIFY_SOCKET): gateways get in with the token of the credential file, never with its name,
and the guide's operator commands make an API key beside the running daemon."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.docs.runner import blocks
from tests.ops.test_systemd_unit import UNIT, analyze, directives
from tests.support.daemon import RATELIMITD, Daemon, daemons, http, wait_healthy
from tests.support.redis_servers import free_port

__all__ = ["daemons"]  # fixture

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operations.md"
RESERVE = {"user": "u1", "tier": "free", "model": "gpt-4o", "input_tokens": 10}
# bash functions standing in for what needs a real Debian root and systemd
STUBS = r'''
apt-get() { echo "apt-get $*" >>"$STUB_LOG"; }
systemctl() { echo "systemctl $*" >>"$STUB_LOG"; }
journalctl() { echo "journalctl $*" >>"$STUB_LOG"; }
python3() {
  if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/sh\nexec %s "$@"\n' "$TEST_RATELIMITD" >"$3/bin/ratelimitd"
    printf '#!/bin/sh\necho "pip $*" >>"%s"\n' "$STUB_LOG" >"$3/bin/pip"
    chmod 0755 "$3/bin/ratelimitd" "$3/bin/pip"
  else command python3 "$@"; fi
}
'''


def guide_blocks() -> list[str]:
    """The install section's two sh blocks: the installation, then its use."""
    text = GUIDE.read_text()
    start = text.index("## Install as a systemd service")
    end = text.index("\n## ", start + 1)
    section_start = text[:start].count("\n") + 1
    section_end = text[:end].count("\n") + 1
    found = [b.text for b in blocks(GUIDE)
             if b.language == "sh" and section_start <= b.line <= section_end]
    assert len(found) >= 2, found
    return found[:2]


def moved(text: str, root: Path) -> str:
    """The guide's absolute paths under `root`."""
    return re.sub(r"(?<![\w./$-])/(etc|opt|var|run)/", f"{root}/\\1/", text)


def run_guide(script: str, root: Path, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{STUBS}\n{moved(script, root)}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def debian_root(root: Path) -> None:
    """What a Debian root has that the guide relies on: systemd's units and /bin/kill."""
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system",
                    symlinks=True)
    kill = root / "bin" / "kill"
    kill.parent.mkdir()
    kill.write_text("#!/bin/sh\n")
    kill.chmod(0o755)


def test_the_install_guide_installs_a_service_that_serves_with_its_credentials(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    root = tmp_path / "root"
    debian_root(root)
    stub_log = tmp_path / "stubs.log"
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith("RATELIMITD_") and k != "CREDENTIALS_DIRECTORY"},
           "HOME": str(tmp_path), "STUB_LOG": str(stub_log),
           "TEST_RATELIMITD": str(RATELIMITD)}
    install, use = guide_blocks()
    out = run_guide(install, root, env)
    assert "ok" in out  # check-config
    calls = stub_log.read_text()
    assert "pip install -c constraints.txt ." in calls
    assert "systemctl enable --now ratelimitd" in calls

    # what the guide left: the unit, the config naming credentials, the secrets root's only
    unit = root / "etc" / "systemd" / "system" / "ratelimitd.service"
    assert unit.read_text() == UNIT.read_text()
    config = root / "etc" / "ratelimitd" / "ratelimitd.toml"
    assert 'service_tokens = ["credential:service_tokens"]' in config.read_text()
    assert 'admin_tokens = ["credential:admin_tokens"]' in config.read_text()
    assert (root / "opt" / "ratelimitd" / "docs" / "operations.md").exists()
    credentials = root / "etc" / "ratelimitd" / "credentials"
    assert credentials.stat().st_mode & 0o777 == 0o700
    for name in ("key_pepper", "service_tokens", "admin_tokens"):
        assert (credentials / name).stat().st_mode & 0o777 == 0o600, name

    done = subprocess.run([analyze(), "verify", f"--root={root}", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr

    # start it as systemd would: the unit's command, environment and directories
    port = free_port()
    config.write_text(config.read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
    service = directives(unit.read_text())
    loaded = tmp_path / "credentials"  # systemd copies each LoadCredential= file here
    loaded.mkdir(mode=0o700)
    for entry in service["LoadCredential"]:
        name, _, source = entry.partition(":")
        shutil.copy(moved(source, root), loaded / name)  # the guide wrote every one
    state = root / "var" / "lib" / "ratelimitd"
    runtime = root / "run" / "ratelimitd"
    for directory in (state, runtime):
        directory.mkdir(parents=True, mode=0o700)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    service_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                   **dict(v.split("=", 1) for v in " ".join(service["Environment"]).split()),
                   "STATE_DIRECTORY": str(state), "RUNTIME_DIRECTORY": str(runtime),
                   "CREDENTIALS_DIRECTORY": str(loaded), "NOTIFY_SOCKET": str(tmp_path / "notify")}
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        service_env["TIKTOKEN_CACHE_DIR"] = os.environ["TIKTOKEN_CACHE_DIR"]
    command = shlex.split(moved(service["ExecStart"][0], root))
    assert command[1:] == ["serve", "--config", str(config)]
    daemon = Daemon(tmp_path, "", env=service_env, name="service", command=command)
    daemons.append(daemon)
    assert _until_ready(notify), daemon.log
    wait_healthy(daemon, port)

    token = (credentials / "service_tokens").read_text().split()[0]
    status, answer = http(port, "POST", "/v1/reserve", RESERVE,
                          {"Authorization": "Bearer credential:service_tokens"})
    assert (status, answer["error"]["code"]) == (401, "invalid_service_token"), answer
    status, answer = http(port, "POST", "/v1/reserve", RESERVE,
                          {"Authorization": f"Bearer {token}"})
    assert status == 200 and answer["allowed"] is True, answer
    assert (state / "redis.sock").exists()  # the embedded Redis lives in StateDirectory=

    # the guide's second block: a gateway's reserve, an operator's key
    out = run_guide(use.replace("localhost:8080", f"127.0.0.1:{port}"), root, env)
    reserved, end = json.JSONDecoder().raw_decode(out)  # curl ends with no newline
    assert reserved["allowed"] is True, out
    assert json.loads(out[end:])["api_key"].startswith("rlk_"), out
    assert daemon.stop() == 0
    assert token not in daemon.log
    for line in daemon.log.splitlines():  # the guide reads the journal with `jq .`
        json.loads(line)
    notify.close()


def _until_ready(notify: socket.socket) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if b"READY=1" in notify.recv(4096):
            return True
    return False
