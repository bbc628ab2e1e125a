"""Bounded outages: with Redis down (killed), slow (SIGSTOP) or partitioned (a proxy that
drops every byte), every call answers within timeout_ms + 50 ms (p99 measured here, over real
HTTP to real daemon processes): on_error = "deny" answers reserves 503 backend_unavailable,
"allow" a degraded 200; commits and releases are errors under both (a commit that was not
recorded is never a success); /readyz answers 503; and service resumes by itself."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemons import DaemonProcess
from tests.support.partition import Proxy
from tests.support.redis_servers import RedisServer, redis_binary

TIMEOUT_MS = 100
BOUND_MS = TIMEOUT_MS + 50
ROUNDS = 100
# as the embedded Redis keeps its data (append-only file), so a Redis that was down comes back
# with its reservations
PERSISTENT = ["--appendonly", "yes", "--appendfsync", "everysec"]
# the daemons' answers are timed on a machine shared with other work: they run at a higher
# priority, so the bound measures them and not the scheduler (root can; others run at 0)
PRIORITY = 10 if os.geteuid() == 0 else 0
TIER = "[tiers.t]\nrequests_per_minute = 100000\nanomaly = false\n"   # one busy user
RESERVE: dict[str, Any] = {"user": "u1", "tier": "t", "model": "gpt-4o",
                           "input_tokens": 10, "max_output_tokens": 10}


@dataclass
class Setup:
    redis: RedisServer
    proxy: Proxy
    deny: DaemonProcess
    allow: DaemonProcess
    session: aiohttp.ClientSession

    def restart_redis(self) -> None:
        self.redis.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.redis.port), "--bind", "127.0.0.1", "--save",
             "", "--dir", str(self.redis.workdir), *PERSISTENT],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    redis = RedisServer(tmp_path / "redis", extra=PERSISTENT)
    proxy = Proxy(redis.port)
    await proxy.start()
    toml = f'url = "redis://127.0.0.1:{proxy.port}/0"\ntimeout_ms = {TIMEOUT_MS}\n'
    deny = DaemonProcess(tmp_path, toml + 'on_error = "deny"', TIER, name="deny",
                         priority=PRIORITY)
    allow = DaemonProcess(tmp_path, toml + 'on_error = "allow"', TIER, name="allow",
                          priority=PRIORITY)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        for daemon in (deny, allow):
            await asyncio.to_thread(daemon.wait_ready)
        yield Setup(redis, proxy, deny, allow, session)
    finally:
        await session.close()
        for daemon in (deny, allow):
            daemon.stop()
        await proxy.stop()
        if redis.proc.poll() is None:
            os.kill(redis.proc.pid, signal.SIGCONT)
            redis.stop()


async def request(setup: Setup, daemon: DaemonProcess, method: str, path: str,
                  body: Any = None) -> tuple[int, Any, float]:
    started = time.perf_counter()
    async with setup.session.request(method, daemon.url + path, json=body) as answer:
        data = await answer.json(content_type=None)
    return answer.status, data, (time.perf_counter() - started) * 1000


async def healthy(setup: Setup, daemon: DaemonProcess, method: str, path: str,
                  body: Any = None) -> Any:
    """A call while Redis is up, retried on 503 as a gateway does: on a machine this busy a
    healthy call can outlast the 100 ms timeout too (a 503, or with on_error = "allow" a
    degraded 200, is then the right answer)."""
    deadline = time.monotonic() + 10
    while True:
        status, data, _ = await request(setup, daemon, method, path, body)
        failed = status == 503 or (isinstance(data, dict) and data.get("degraded"))
        if not failed or time.monotonic() > deadline:
            assert status == 200, data
            return data
        await asyncio.sleep(0.05)


async def reservation(setup: Setup, daemon: DaemonProcess) -> str:
    data = await healthy(setup, daemon, "POST", "/v1/reserve", RESERVE)
    return str(data["reservation_id"])


async def settled(setup: Setup, daemon: DaemonProcess) -> None:
    """A reserve, its commit, a repeat, a release of it and /readyz."""
    rid = await reservation(setup, daemon)
    for path in ("/v1/commit", "/v1/commit"):
        await healthy(setup, daemon, "POST", path, {"reservation_id": rid, "input_tokens": 10,
                                                   "output_tokens": 5})
    await request(setup, daemon, "POST", "/v1/release", {"reservation_id": rid})  # a 409
    await healthy(setup, daemon, "GET", "/readyz")


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def check_outage(setup: Setup, start: Callable[[], Awaitable[None] | None],
                       end: Callable[[], Awaitable[None] | None]) -> None:
    # Warm, as a daemon in service is: every call served a few times (lazy imports, caches),
    # and the client's connections open, as a gateway keeps them. The latencies are then the
    # daemons' answers, not a fresh process's first steps or TCP handshakes.
    for _ in range(3):
        await asyncio.gather(*(settled(setup, d) for d in (setup.deny, setup.allow)
                               for _ in range(8)))
    rids = {d.port: await reservation(setup, d) for d in (setup.deny, setup.allow)}
    await asyncio.sleep(1.2)     # past one fsync of the append-only file (everysec)
    with raised_priority():
        latencies = await timed_calls(setup, start, rids)
    result = end()
    if result is not None:
        await result
    assert p99(latencies) <= BOUND_MS, (f"p99 {p99(latencies):.1f} ms over {len(latencies)} "
                                        f"calls; bound {BOUND_MS} ms")
    slow = sum(t > BOUND_MS for t in latencies)
    print(f"\np99 {p99(latencies):.1f} ms, max {max(latencies):.1f} ms, {len(latencies)} calls, "
          f"{slow} over {BOUND_MS} ms")
    await check_resumed(setup, rids)


@contextlib.contextmanager
def raised_priority() -> Iterator[None]:
    """This process (the clients, the proxy) at the daemons' priority, and without garbage
    collector pauses (a full collection of pytest's heap takes tens of ms), while it times
    the daemons: the figures are theirs."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if PRIORITY:
        os.setpriority(os.PRIO_PROCESS, 0, before - PRIORITY)
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        if PRIORITY:
            os.setpriority(os.PRIO_PROCESS, 0, before)


async def timed_calls(setup: Setup, start: Callable[[], Awaitable[None] | None],
                      rids: dict[int, str]) -> list[float]:
    """Starts the fault, then times rounds of every call on both daemons."""
    result = start()
    if result is not None:
        await result
    latencies: list[float] = []
    # A steady stream over the outage, as gateways send: 100 rounds of every call on both
    # daemons (1,600 calls, ~2 s). The first round waits out the timeout (the calls in flight
    # when Redis went away); later ones fail at once (store/pipeline.py) until it is back.
    for _ in range(ROUNDS):
        calls = []
        for daemon in (setup.deny, setup.allow):
            rid = rids[daemon.port]
            calls += [request(setup, daemon, "POST", "/v1/reserve", RESERVE) for _ in range(5)]
            calls += [request(setup, daemon, "POST", "/v1/commit",
                              {"reservation_id": rid, "input_tokens": 10, "output_tokens": 5}),
                      request(setup, daemon, "POST", "/v1/release", {"reservation_id": rid}),
                      request(setup, daemon, "GET", "/readyz")]
        answers = await asyncio.gather(*calls)
        await asyncio.sleep(0.01)
        per_daemon = len(answers) // 2
        for i, (status, data, elapsed) in enumerate(answers):
            latencies.append(elapsed)
            allow = i >= per_daemon
            kind = ("reserve", "reserve", "reserve", "reserve", "reserve", "commit", "release",
                    "readyz")[i % per_daemon]
            if kind == "reserve" and allow:
                assert status == 200 and data["degraded"] is True, data
            elif kind == "readyz":
                assert status == 503 and data["ready"] is False, data
            else:
                assert status == 503 and data["error"]["code"] == "backend_unavailable", data
    return latencies


async def check_resumed(setup: Setup, rids: dict[int, str]) -> None:
    """Service resumes by itself: a fresh reserve and the pending commit go through."""
    deadline = time.monotonic() + 15
    for daemon in (setup.deny, setup.allow):
        while True:
            status, data, _ = await request(setup, daemon, "POST", "/v1/reserve", RESERVE)
            if status == 200 and not data.get("degraded"):
                break
            assert time.monotonic() < deadline, f"{daemon.url} did not resume: {data}"
            await asyncio.sleep(0.1)
        assert (await healthy(setup, daemon, "GET", "/readyz"))["ready"] is True
        data = await healthy(setup, daemon, "POST", "/v1/commit", {
            "reservation_id": rids[daemon.port], "input_tokens": 10, "output_tokens": 5})
        assert data["committed"] is True, data


async def test_redis_down(setup: Setup) -> None:
    def kill() -> None:
        setup.redis.proc.kill()
        setup.redis.proc.wait(10)
    await check_outage(setup, kill, setup.restart_redis)


async def test_redis_stopped(setup: Setup) -> None:
    await check_outage(setup, lambda: os.kill(setup.redis.proc.pid, signal.SIGSTOP),
                       lambda: os.kill(setup.redis.proc.pid, signal.SIGCONT))


async def test_network_partition(setup: Setup) -> None:
    def cut() -> None:
        setup.proxy.partitioned = True

    def heal() -> None:
        setup.proxy.partitioned = False
    await check_outage(setup, cut, heal)
