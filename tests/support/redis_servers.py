"""Real redis-server processes for the tests, on free loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server is not installed; the tests need a real one "
            "(run scripts/test.sh, which installs it, or apt-get install redis-server)"
        )
    return path


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
