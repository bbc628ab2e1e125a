"""Throughput and latency of one daemon process, beside a no-op aiohttp handler.

Both servers run as one process on loopback and get the same wrk load (same threads,
connections and duration), alternating so machine noise hits both: the daemon answers
reserve + commit pairs (bench/reserve_commit.lua), the no-op handler answers the same requests
with a constant. Target: >= 0.35x the no-op throughput.

With two or more CPUs, each server gets CPU 0 to itself and wrk (and the daemon's Redis, set
up like the embedded one: unix socket, append-only file, fsync every second) share CPU 1, as
when Redis and the callers live on other hosts. Unpinned, on a two-core machine, the scheduler
sometimes puts the daemon and Redis on one core, and a run measures that instead (seen here:
0.28x to 0.37x from one run to the next).
Usage: python bench/http_bench.py [--duration 10] [--connections 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from tests.support.redis_servers import free_port  # noqa: E402

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


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def ms(text: str) -> float:
    """wrk's durations: 812.00us, 1.25ms, 1.02s, 1.10m."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    number, unit = match.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


PIN = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def on_cpu(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if PIN else cmd


def start_redis(data: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A redis-server as the embedded one runs (ratelimitd/embedded.py), on the helper CPU."""
    data.mkdir(parents=True)
    socket = data / "redis.sock"
    proc = subprocess.Popen(on_cpu(1, [
        "redis-server", "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "600",
        "--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--logfile", str(data / "redis.log")]))
    deadline = time.monotonic() + 10
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return proc, socket


def run_wrk(port: int, args: argparse.Namespace, script: str = "reserve_commit.lua",
            script_args: tuple[str, ...] = ()) -> Result:
    out = subprocess.run(
        on_cpu(1, ["wrk", "-t", str(args.threads), "-c", str(args.connections),
                   "-d", f"{args.duration}s", "--latency", "-s", str(BENCH / script),
                   f"http://127.0.0.1:{port}", *(["--", *script_args] if script_args else [])]),
        capture_output=True, text=True, check=True).stdout
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        p50 = ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        p99 = ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        raise RuntimeError(f"could not read wrk's output:\n{out}") from exc
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(rps, p50, p99, errors)


def bench_server(cmd: list[str], port: int, args: argparse.Namespace) -> Result:
    proc = subprocess.Popen(on_cpu(0, cmd), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc) if "serve" in cmd else \
            time.sleep(1.5)
        run_wrk(port, argparse.Namespace(**{**vars(args), "duration": 2}))  # warm-up
        return run_wrk(port, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keys", action="store_true",
                        help="instead: API keys (cache hits, misses) against identities "
                             "(bench/http_keys_bench.py)")
    args = parser.parse_args()
    if args.keys:
        from http_keys_bench import compare
        compare(args)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: run bash scripts/setup.sh bench")
    python = sys.executable
    daemon_runs, noop_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            port = free_port()
            noop_runs.append(bench_server([python, str(BENCH / "noop_server.py"), str(port)],
                                          port, args))
            port = free_port()
            # a fresh Redis each round: an append-only file grown by earlier rounds would be
            # rewritten (a fork) during a later one
            redis, socket = start_redis(Path(tmp) / f"redis-{round_}")
            try:
                config = Path(tmp) / "bench.toml"
                config.write_text(CONFIG.format(port=port, socket=socket))
                daemon = [str(Path(python).parent / "ratelimitd"), "serve", "--config",
                          str(config)]
                daemon_runs.append(bench_server(daemon, port, args))
            finally:
                redis.terminate()
                redis.wait(10)
    noop = max(noop_runs, key=lambda r: r.rps)
    ours = max(daemon_runs, key=lambda r: r.rps)
    ratio = ours.rps / noop.rps
    pinning = ("server on CPU 0, wrk and Redis on CPU 1" if PIN
               else "not pinned (taskset missing or one CPU)")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, best of {args.rounds} "
          f"alternating rounds, one server process each, loopback, {pinning}")
    print("| server | requests/s | reserve+commit pairs/s | p50 | p99 | errors |")
    print("|---|---|---|---|---|---|")
    print(f"| no-op aiohttp handler (baseline) | {noop.rps:,.0f} | - | {noop.p50_ms:.2f} ms | "
          f"{noop.p99_ms:.2f} ms | {noop.errors} |")
    print(f"| ratelimitd | {ours.rps:,.0f} | {ours.rps / 2:,.0f} | "
          f"{ours.p50_ms:.2f} ms | {ours.p99_ms:.2f} ms | {ours.errors} |")
    print(f"throughput vs no-op: {ratio:.2f}x (target >= 0.35x: "
          f"{'met' if ratio >= 0.35 else 'MISSED'})")
    if ours.errors:
        print(f"WARNING: {ours.errors} requests failed or were not 2xx")


if __name__ == "__main__":
    main()
