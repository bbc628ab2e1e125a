"""`ratelimitd serve` processes for the scale tests, pointed at a Redis the test started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.redis_servers import free_port

RATELIMITD = Path(sys.executable).parent / "ratelimitd"


class DaemonProcess:
    """One `ratelimitd serve` on a free loopback port with `redis_toml` as its [redis]
    section and `rest` appended to its config; stderr goes to a log file. `priority` > 0
    raises its scheduling priority (a lower nice value; needs root) for tests that time its
    answers on a machine shared with other work."""

    def __init__(self, workdir: Path, redis_toml: str, rest: str = "", *args: str,
                 name: str = "daemon", priority: int = 0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / f"{name}.toml"
        config.write_text(f'[server]\nlisten = ["127.0.0.1:{self.port}"]\n'
                          f"[redis]\n{redis_toml}\n{rest}")
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(RATELIMITD), "serve", "--config", str(config), *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.nice(-priority)) if priority else None)

    def wait_ready(self, seconds: float = 45) -> None:
        """Until /readyz answers 200 (Redis reachable, library loaded)."""
        deadline = time.monotonic() + seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ratelimitd exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ratelimitd on {self.url} not ready after {seconds} s:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
