"""Memory per worker: `serve --workers 3` loads the tokenizer tables once, before it forks, so
each worker's own memory (USS: its private pages, /proc/PID/smaps_rollup) stays small after it
has counted prompts in both bundled encodings."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.support.daemons import DaemonProcess
from tests.support.redis_servers import RedisServer

MAX_USS_MB = 40


def uss_mb(pid: int) -> float:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def worker_pids(daemon: DaemonProcess, count: int) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        pid = daemon.proc.pid
        workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(workers) >= count:
            return [int(w) for w in workers]
        assert time.monotonic() < deadline, f"{count} workers did not start"
        time.sleep(0.1)


async def test_each_extra_worker_holds_at_most_40_mb_of_its_own(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    daemon = DaemonProcess(tmp_path, f'url = "{redis.url}"\ntimeout_ms = 2000', "",
                           "--workers", "3")
    try:
        daemon.wait_ready()
        workers = await asyncio.to_thread(worker_pids, daemon, 3)
        models = ("gpt-4o", "gpt-4")   # o200k_base and cl100k_base
        connector = aiohttp.TCPConnector(force_close=True)   # new connections reach every worker
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(120):
                body = {"user": f"u{i}", "tier": "pro", "model": models[i % 2],
                        "prompt": f"Count the tokens of prompt number {i}."}
                async with session.post(f"{daemon.url}/v1/reserve", json=body) as answer:
                    assert answer.status == 200, await answer.text()
        sizes = [uss_mb(pid) for pid in workers]
        assert all(size <= MAX_USS_MB for size in sizes), sizes
    finally:
        daemon.stop()
        redis.stop()
