"""systemd/ratelimitd.service: systemd-analyze verifies it and rates its exposure at most 2.5."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ratelimitd.service"
MAX_EXPOSURE = 2.5


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: `bash scripts/setup.sh dev` installs it "
                    "(Debian package systemd)")
    return path


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values in order (a key may repeat), of the [Service] section."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_security_exposure_is_at_most_2_5() -> None:
    done = subprocess.run([analyze(), "security", "--offline=true", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for ratelimitd\.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


def test_verify_passes_without_a_warning(tmp_path: Path) -> None:
    """verify checks the executables too, so it runs on a root holding the unit, the paths
    it runs and systemd's own units (it exits 0 on unknown keys: those only warn)."""
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr" / "lib" / "systemd" / "system",
                    symlinks=True)
    for command in ("ExecStart", "ExecReload"):
        executable = directives(UNIT.read_text())[command][0].split()[0]
        target = tmp_path / executable.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/bin/sh\n")
        target.chmod(0o755)
    done = subprocess.run([analyze(), "verify", f"--root={tmp_path}",
                           str(units / UNIT.name)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_verify_catches_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    broken = tmp_path / "ratelimitd.service"
    broken.write_text(UNIT.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    done = subprocess.run([analyze(), "verify", str(broken)], capture_output=True, text=True,
                          timeout=60)
    assert "Unknown key 'ProtectHomes'" in done.stderr


def test_the_unit_says_what_issue_14_asks() -> None:
    found = directives(UNIT.read_text())
    expected = {
        "Type": "notify", "Restart": "on-failure", "DynamicUser": "yes",
        "StateDirectory": "ratelimitd", "ConfigurationDirectory": "ratelimitd",
        "ExecReload": "/bin/kill -HUP $MAINPID", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "", "UMask": "0077",
    }
    for key, value in expected.items():
        assert found.get(key, [None])[0] == value, key
    assert "@system-service" in found["SystemCallFilter"]
    for key in ("WatchdogSec", "LimitNOFILE", "MemoryMax"):
        assert found.get(key), key
    credentials = {v.split(":")[0] for v in found["LoadCredential"]}
    assert {"key_pepper", "service_tokens", "admin_tokens"} <= credentials
    assert found["ExecStart"][0].startswith("/opt/ratelimitd/.venv/bin/ratelimitd serve --config ")
