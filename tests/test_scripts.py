"""scripts/setup.sh (which serve.sh and test.sh run first) installs only when the virtualenv is
missing or pyproject.toml or constraints.txt changed (a restart needs no package index), and
always at the exact versions constraints.txt names."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkout(tmp_path: Path) -> Path:
    """scripts/, pyproject.toml and constraints.txt, with a .venv whose pip only logs its
    arguments."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", checkout / "scripts")
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    shutil.copy(ROOT / "constraints.txt", checkout / "constraints.txt")
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


SERVE = "install -q -c constraints.txt -e ."


def test_setup_installs_once_then_only_when_pyproject_or_the_lock_changes(tmp_path: Path) -> None:
    assert shutil.which("redis-server"), "the test needs redis-server (no apt step)"
    checkout = make_checkout(tmp_path)
    assert setup(checkout) == [SERVE]
    assert setup(checkout) == []                       # a restart: nothing installed
    assert setup(checkout, "dev") == [SERVE + "[dev]"]
    assert setup(checkout, "dev") == []
    assert setup(checkout) == []                       # the dev install serves too
    for changed in ("pyproject.toml", "constraints.txt"):
        with (checkout / changed).open("a") as f:
            f.write("\n# changed\n")
        assert setup(checkout) == [SERVE]
        assert setup(checkout) == []


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_dependency_is_locked_at_a_version_its_lower_bound_admits() -> None:
    """The ranges in pyproject.toml are what a user's pip may pick; their lower bounds must be
    versions the suite ran on, i.e. no lower than the lock (which is what CI installs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    pins = locked_versions()
    for requirement in wanted:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z,]+\])?(>=|==)([0-9][0-9a-z.]*)",
                             requirement)
        assert match, f"{requirement!r}: give an exact or a lower bound (>=) that was tested"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert name in pins, f"{name} is not in constraints.txt: run scripts/lock.sh"
        assert match.group(4) == pins[name], (
            f"{requirement!r}: the bound should be the locked, tested {pins[name]}")


def test_serve_and_test_scripts_go_through_setup() -> None:
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    test = (ROOT / "scripts" / "test.sh").read_text()
    assert "bash scripts/setup.sh\n" in serve and "exec .venv/bin/ratelimitd serve" in serve
    assert "bash scripts/setup.sh dev" in test and ".venv/bin/pytest" in test
