"""scripts/setup.sh (which serve.sh and test.sh run first) installs only when the virtualenv is
missing or pyproject.toml changed: a restart needs no package index."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkout(tmp_path: Path) -> Path:
    """scripts/ and pyproject.toml, with a .venv whose pip only logs its arguments."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", checkout / "scripts")
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(shutil.which("python3") or "/usr/bin/python3")
    pip = bin_dir / "pip"
    pip.write_text(f'#!/bin/sh\necho "$@" >> "{checkout}/pip.log"\n')
    pip.chmod(0o755)
    return checkout


def setup(checkout: Path, *args: str) -> list[str]:
    """Runs setup.sh; returns the pip calls it made."""
    log = checkout / "pip.log"
    log.unlink(missing_ok=True)
    done = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=checkout,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_setup_installs_once_then_only_when_pyproject_changes(tmp_path: Path) -> None:
    assert shutil.which("redis-server"), "the test needs redis-server (no apt step)"
    checkout = make_checkout(tmp_path)
    assert setup(checkout) == ["install -q -e ."]
    assert setup(checkout) == []                       # a restart: nothing installed
    assert setup(checkout, "dev") == ["install -q -e .[dev]"]
    assert setup(checkout, "dev") == []
    assert setup(checkout) == []                       # the dev install serves too
    with (checkout / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    assert setup(checkout) == ["install -q -e ."]
    assert setup(checkout) == []


def test_serve_and_test_scripts_go_through_setup() -> None:
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    test = (ROOT / "scripts" / "test.sh").read_text()
    assert "bash scripts/setup.sh\n" in serve and "exec .venv/bin/ratelimitd serve" in serve
    assert "bash scripts/setup.sh dev" in test and ".venv/bin/pytest" in test
