"""What ratelimitd.client costs a gateway: guard() cycles against bare aiohttp posts.

One daemon process (`python -m ratelimitd serve`, Redis on a unix socket) serves both sides
in turn: `guard` (reserve on enter, commit on exit, typed answers, retry bookkeeping) and the
same two requests sent with a bare aiohttp session. Both use one session and `--concurrency`
callers, alternating rounds so machine noise hits both. Reported: cycles per second and p50 /
p99 of a cycle, best round of each. Short by design (2 cores shared with others).
Usage: python bench/client_bench.py [--cycles 2000] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratelimitd.client import RatelimitdClient  # noqa: E402
from tests.client.helpers import process  # noqa: E402
from tests.support.redis_servers import free_port, redis_binary  # noqa: E402

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
[redis]
url = "unix://{socket}"
[tiers.bench]
requests_per_minute = 1000000000
tokens_per_day = 1000000000000
daily_budget_usd = 1000000.0
max_concurrent = 1000000
max_output_tokens = 4000
"""
MESSAGES = [{"role": "user", "content": "Write a haiku about budgets, please."}]
Cycle = Callable[[int], Awaitable[None]]


async def run(cycle: Cycle, cycles: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = iter(range(cycles))

    async def caller() -> None:
        for i in queue:
            start = time.perf_counter()
            await cycle(i)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return cycles / (time.perf_counter() - start), latencies


async def bench(url: str, cycles: int, concurrency: int, rounds: int) -> None:
    rl = RatelimitdClient(url)
    http = aiohttp.ClientSession()

    async def with_guard(i: int) -> None:
        async with rl.guard(user=f"u{i % 100}", tier="bench", model="gpt-4o",
                            messages=MESSAGES) as call:
            call.set_usage(12, 40)

    async def bare(i: int) -> None:
        body = {"user": f"u{i % 100}", "tier": "bench", "model": "gpt-4o",
                "messages": MESSAGES, "idempotency_key": f"k{time.perf_counter_ns()}"}
        async with http.post(f"{url}/v1/reserve", json=body) as resp:
            rid = (await resp.json())["reservation_id"]
        async with http.post(f"{url}/v1/commit", json={
                "reservation_id": rid, "input_tokens": 12, "output_tokens": 40}) as resp:
            await resp.read()

    best: dict[str, tuple[float, list[float]]] = {}
    await run(bare, 200, concurrency)  # warm up both paths and the daemon
    await run(with_guard, 200, concurrency)
    for _ in range(rounds):
        for name, cycle in (("bare aiohttp", bare), ("client.guard", with_guard)):
            rate, lat = await run(cycle, cycles, concurrency)
            if name not in best or rate > best[name][0]:
                best[name] = (rate, lat)
    for name, (rate, lat) in best.items():
        q = statistics.quantiles(lat, n=100)
        print(f"{name:14s} {rate:8.0f} reserve+commit/s  p50 {q[49] * 1000:6.2f} ms  "
              f"p99 {q[98] * 1000:6.2f} ms")
    print(f"client.guard / bare: {best['client.guard'][0] / best['bare aiohttp'][0]:.2f}x")
    await rl.close()
    await http.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "redis.sock"
        redis = subprocess.Popen([redis_binary(), "--port", "0", "--unixsocket", str(sock),
                                  "--save", "", "--appendonly", "no", "--dir", tmp],
                                 stdout=subprocess.DEVNULL)
        try:
            port = free_port()
            conf = Path(tmp) / "bench.toml"
            conf.write_text(CONFIG.format(port=port, socket=sock))
            daemon = [sys.executable, "-m", "ratelimitd", "serve", "--config", str(conf)]
            with process(daemon, port, "ratelimitd"):
                asyncio.run(bench(f"http://127.0.0.1:{port}", args.cycles, args.concurrency,
                                  args.rounds))
        finally:
            redis.terminate()
            redis.wait()


if __name__ == "__main__":
    main()
