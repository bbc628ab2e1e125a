"""Shared by the client and gateway tests: configs, a daemon's URL, reading usage back.

Usage is read back through the API itself: a dry-run reserve answers "as if reserving", so its
`remaining` is the limit minus everything charged so far minus the dry run's own estimate.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from ratelimitd.client import RatelimitdClient

GPT4O = {"input": 2.5, "output": 10.0, "cached_input": 1.25}
TOKENS_PER_DAY = 100_000
# A probe's estimate: no input, a cap of 16 tokens (min_output_tokens is 16 by default).
PROBE_TOKENS = 16


def tier(**limits: Any) -> dict[str, Any]:
    return {"requests_per_minute": 50, "tokens_per_day": TOKENS_PER_DAY, "daily_budget_usd": 5.0,
            "max_concurrent": 4, "max_output_tokens": 300, **limits}


def config(**limits: Any) -> dict[str, Any]:
    """One tier "t" and gpt-4o's prices."""
    return {"tiers": {"t": tier(**limits)}, "pricing": {"gpt-4o": GPT4O}}


def url_of(client: TestClient[Any, Any]) -> str:
    return str(client.make_url("/")).rstrip("/")


async def usage_of(rl: RatelimitdClient, user: str = "u1") -> dict[str, Any]:
    """What user (tier t) has been charged so far on each limit, read with a dry run."""
    probe = await rl.reserve(user=user, tier="t", model="gpt-4o", input_tokens=0,
                             max_output_tokens=PROBE_TOKENS, dry_run=True)
    lim = {item.name: item for item in probe.limits}
    return {
        "requests": 50 - 1 - int(lim["requests_per_minute"].remaining),
        "tokens": TOKENS_PER_DAY - PROBE_TOKENS - int(lim["tokens_per_day"].remaining),
        "concurrent": 4 - 1 - int(lim["max_concurrent"].remaining),
        "cost_nano": 5_000_000_000 - round(float(lim["daily_budget_usd"].remaining) * 1e9)
        - cost_nano(0, PROBE_TOKENS),
    }


def cost_nano(input_tokens: int, output_tokens: int, cached: int = 0) -> int:
    """The documented price formula for gpt-4o, in nano-USD rounded up."""
    micro = (input_tokens - cached) * 2_500_000 + cached * 1_250_000 + output_tokens * 10_000_000
    return -(-micro // 1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout and proc.poll() is not None \
                    else ""
                raise RuntimeError(f"{what} did not start on port {port}: {out}") from None
            time.sleep(0.05)


@contextmanager
def process(args: list[str], port: int, what: str, env: Mapping[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process serving on 127.0.0.1:port, stopped (SIGTERM) at the end."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    try:
        wait_for_port(port, proc, what)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def daemon_args(config_toml: str, tmp: Path) -> list[str]:
    """`python -m ratelimitd serve` with a config file written to tmp."""
    path = tmp / "ratelimitd.toml"
    path.write_text(config_toml)
    return [sys.executable, "-m", "ratelimitd", "serve", "--config", str(path)]
