"""The reserve path with API keys against identities: throughput, latency, Redis calls.

Run through `python bench/http_bench.py --keys [--duration 8] [--rounds 3]`. Three daemons, one
after the other in every round (so machine noise hits each), each with a fresh Redis set up
like the embedded one, the same wrk load (reserve + commit pairs, bench/reserve_commit_keys.lua)
and the same tier:
- identity: the gateway sends user + tier, 10 users;
- keys, cache hits: 10 API keys, each reused every few ms, within the 1 s resolve cache;
- keys, cache misses: 5,000 keys, each reused only every few seconds, past the cache: every
  resolve reads the key's record (one Redis call more).
The daemon's CPU time per pair (from /proc, around the measured run) is steadier than
throughput on a shared machine. Redis calls per pair: the scripts the daemon sent (INFO
commandstats around the measured run); a reserve is one call per subject and guard, sent in
one tick, plus one before them for a key's record on a cache miss.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import aiohttp
import http_bench as hb
import redis

ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)
# http_bench's daemon, with an admin token and a 1 s Redis timeout (the same in every mode: on
# a saturated shared machine the default 100 ms turns waits for a CPU into 503s)
CONFIG = (hb.CONFIG.replace("[server]\n", f'[server]\nadmin_tokens = ["{ADMIN_TOKEN}"]\n', 1)
          .replace("[redis]\n", "[redis]\ntimeout_ms = 1000\n", 1))
# A cached key is read again after 1 s whatever its use, so a few keys keep the hit rate high
# even at a saturated machine's 100 pairs/s (10 keys: at most 10 misses a second)
MODES = (("identity (user + tier)", "users", 10), ("api_key, cache hits", "keys", 10),
         ("api_key, cache misses", "keys", 5000))


@dataclass
class Run:
    result: hb.Result
    redis_calls_per_pair: float
    cpu_us_per_pair: float         # the daemon's CPU time (user + system): less noisy than rps


def _cpu_s(pid: int) -> float:
    """CPU seconds a process used so far (utime + stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _create_keys(port: int, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    limit = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(headers=headers) as session:
        async def one(i: int) -> str:
            for _attempt in range(5):   # a busy shared machine may time a call out: retry
                async with limit, session.post(f"http://127.0.0.1:{port}/v1/admin/keys",
                                               json={"user": f"bench-{i}",
                                                     "tier": "bench"}) as resp:
                    body = await resp.json()
                if resp.status == 201:
                    return str(body["api_key"])
                await asyncio.sleep(0.1)
            raise RuntimeError(f"key creation failed: {body}")
        return list(await asyncio.gather(*(one(i) for i in range(count))))


# Every hot-path call the daemon sends is a script; commandstats also counts what scripts
# call inside Redis (GET, SET, HSET...), so only the script calls are summed
_CLIENT_COMMANDS = ("fcall", "fcall_ro", "eval", "evalsha", "eval_ro", "evalsha_ro")


def _redis_calls(socket: Path) -> int:
    """Script calls the daemon sent."""
    stats = redis.Redis(unix_socket_path=str(socket)).info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in _CLIENT_COMMANDS)


def _measure(mode: str, callers: int, tmp: Path, round_: int, args: argparse.Namespace) -> Run:
    port = hb.free_port()
    redis_proc, socket = hb.start_redis(tmp / f"redis-{round_}-{mode}-{callers}")
    config = tmp / "bench.toml"
    config.write_text(CONFIG.format(port=port, socket=socket))
    daemon = subprocess.Popen(hb.on_cpu(0, [str(Path(sys.executable).parent / "ratelimitd"),
                                            "serve", "--config", str(config)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hb.wait_ready(f"http://127.0.0.1:{port}/healthz", daemon)
        script_args: tuple[str, ...] = ("users", str(callers))
        if mode == "keys":
            keys_file = tmp / f"keys-{round_}-{callers}.txt"
            keys_file.write_text("\n".join(asyncio.run(_create_keys(port, callers))) + "\n")
            script_args = ("keys", str(keys_file))
        warm = argparse.Namespace(**{**vars(args), "duration": 2})
        hb.run_wrk(port, warm, "reserve_commit_keys.lua", script_args)
        before, cpu = _redis_calls(socket), _cpu_s(daemon.pid)
        result = hb.run_wrk(port, args, "reserve_commit_keys.lua", script_args)
        calls, cpu = _redis_calls(socket) - before, _cpu_s(daemon.pid) - cpu
        pairs = result.rps * args.duration / 2
        return Run(result, calls / pairs if pairs else 0.0, cpu * 1e6 / pairs if pairs else 0.0)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)


def compare(args: argparse.Namespace) -> None:
    os.environ["RATELIMITD_KEY_PEPPER"] = secrets.token_hex(32)   # for the daemons
    runs: dict[str, list[Run]] = {name: [] for name, _, _ in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, mode, callers in MODES:
                runs[name].append(_measure(mode, callers, Path(tmp), round_, args))
    pinning = ("server on CPU 0, wrk and Redis on CPU 1" if hb.PIN
               else "not pinned (taskset missing or one CPU)")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, {args.rounds} "
          f"rounds, modes alternating within each round, one server process, {pinning}")
    print("| caller | reserve+commit pairs/s, every run | median | p50 | p99 | "
          "daemon CPU per pair, every run | Redis calls per pair (scripts) | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, _ in MODES:
        rs = runs[name]
        pairs = [r.result.rps / 2 for r in rs]
        print(f"| {name} | {', '.join(f'{p:,.0f}' for p in pairs)} | {median(pairs):,.0f} | "
              f"{median(r.result.p50_ms for r in rs):.2f} ms | "
              f"{median(r.result.p99_ms for r in rs):.2f} ms | "
              f"{', '.join(f'{r.cpu_us_per_pair:.0f}' for r in rs)} us | "
              f"{median(r.redis_calls_per_pair for r in rs):.2f} | "
              f"{sum(r.result.errors for r in rs)} |")
