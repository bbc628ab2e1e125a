"""The embedded Redis: with no [redis] url, `ratelimitd serve` runs its own redis-server.

It listens only on a unix socket in the state directory (no TCP port), keeps an append-only
file there so budgets survive a restart, and stops when the daemon stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Final

import redis

from ratelimitd.errors import EmbeddedRedisError

START_TIMEOUT_S: Final = 15.0


def state_directory(configured: str) -> Path:
    """[redis] data_dir, else systemd's $STATE_DIRECTORY, else ~/.local/state/ratelimitd."""
    if configured:
        return Path(configured)
    if os.environ.get("STATE_DIRECTORY"):
        # systemd may pass several, colon-separated: the first is ours
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path.home() / ".local" / "state" / "ratelimitd"


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise EmbeddedRedisError(
                "redis-server is not installed, and [redis] url is empty so ratelimitd would "
                "start its own. Install it (Debian/Ubuntu: apt-get install redis-server) or "
                "point [redis] url at a running Redis.")
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._refuse_running_server()
        args = [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "600",
                "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
                "--protected-mode", "yes"]
        # a fixed argument list and the redis-server found on PATH: no shell, no user input
        self.proc = subprocess.Popen(args, stdin=  # noqa: S603
                                     subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {self.proc.returncode}; "
                                         f"see {self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not answer within "
                                         f"{START_TIMEOUT_S:.0f} s; see {self.data_dir}/redis.log")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: Redis flushes the append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            return False

    def _refuse_running_server(self) -> None:
        if self.socket.exists():
            if self._answers():
                raise EmbeddedRedisError(
                    f"a Redis already answers on {self.socket}: another ratelimitd is running "
                    "with this state directory; stop it or set [redis] data_dir")
            self.socket.unlink()  # left over from a crash
