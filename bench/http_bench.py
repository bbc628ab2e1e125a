"""CPU per request, throughput and latency of the daemon, beside a no-op aiohttp handler.

The measure that survives a busy machine is CPU time: the server processes' user + system
time (/proc/PID/stat, the daemon's worker processes included with --workers N) over one fixed
wrk run, divided by the requests it served. Other work on the machine slows a request down but
hardly changes what it costs, whereas requests/s and latencies move with the machine's load.

Both servers get the same wrk load (same threads, connections, duration), alternating round
by round so machine noise hits all of them: the daemon answers reserve + commit pairs
(bench/reserve_commit.lua: chat messages counted with tiktoken, a fixed system prompt and a
different user message each call) with its defaults on (JSON access log to a file, metrics,
anomaly state, request ids); the no-op handler (bench/noop_server.py) answers the same
requests with a constant. `--tree DIR` (repeatable) benchmarks the daemon of another checkout
(its own .venv) in the same rounds, so old and new builds alternate under one load.

With two or more CPUs, each server gets CPU 0 (its workers share it) and wrk and the daemon's
Redis (set up like the embedded one: unix socket, append-only file, fsync every second) share
CPU 1, as when Redis and the callers live on other hosts.

The last line printed is, for the first daemon measured (this checkout unless --tree names
others), medians over the rounds:
  cpu_us_per_request=<daemon> noop_cpu_us_per_request=<noop> ratio=<noop/daemon>
Redis' own cost per call is measured by bench/engine_bench.py (server time) and
bench/usage_bench.py --callgrind (instruction counts).
Usage: python bench/http_bench.py [--quick] [--duration 10] [--connections 32] [--rounds 3]
                                  [--workers N] [--tree DIR ...]
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
from statistics import median

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
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    cpu_us_per_request: float = 0.0


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


def process_tree(pid: int) -> list[int]:
    """pid and every process below it (a supervisor's workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
    return pids


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (utime + stime of /proc/PID/stat) the processes used so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICKS_PER_S


def start_redis(data: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A redis-server as the embedded one runs (ratelimitd/store/embedded.py), on CPU 1."""
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
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        raise RuntimeError(f"could not read wrk's output:\n{out}") from exc
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(rps, p50, p99, errors, requests)


def bench_server(cmd: list[str], port: int, args: argparse.Namespace,
                 log: Path | None = None, tree: Path | None = None) -> Result:
    """One server under wrk: a warm-up run, then the measured run and its CPU per request.
    `tree`: the checkout whose code the server runs (first on its import path)."""
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree is not None else None
    with open(log or os.devnull, "wb") as stderr:
        proc = subprocess.Popen(on_cpu(0, cmd), stdout=subprocess.DEVNULL, stderr=stderr,
                                env=env)
        try:
            if "serve" in cmd:
                wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
            else:
                time.sleep(1.5)
            run_wrk(port, argparse.Namespace(**{**vars(args), "duration": args.warmup}))
            pids = process_tree(proc.pid)
            before = cpu_s(pids)
            result = run_wrk(port, args)
            used = cpu_s(pids) - before
            result.cpu_us_per_request = used * 1e6 / max(result.requests, 1)
            return result
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def bench_daemon(tree: Path, tmp: Path, name: str, args: argparse.Namespace) -> Result:
    """The daemon of checkout `tree` (its .venv) on a fresh Redis: an append-only file grown
    by earlier runs would be rewritten (a fork) during a later one."""
    port = free_port()
    redis, socket = start_redis(tmp / f"redis-{name}")
    try:
        config = tmp / f"{name}.toml"
        config.write_text(CONFIG.format(port=port, socket=socket))
        daemon = [str(tree / ".venv" / "bin" / "ratelimitd"), "serve", "--config", str(config)]
        if args.workers > 1:
            daemon += ["--workers", str(args.workers)]
        log = tmp / f"{name}.log"
        result = bench_server(daemon, port, args, log, tree)
        if args.workers == 1 and log.read_bytes().count(b'"ratelimitd.access"') < result.requests:
            print(f"note: {tree}: fewer access-log lines than requests (a build without an "
                  "access log?)", file=sys.stderr)
        return result
    finally:
        redis.terminate()
        redis.wait(10)


def _every(results: list[Result], value: str, fmt: str) -> str:
    return " / ".join(format(getattr(r, value), fmt) for r in results)


def report(args: argparse.Namespace, noop: list[Result],
           daemons: dict[Path, list[Result]]) -> None:
    pinning = ("server on CPU 0, wrk and Redis on CPU 1" if PIN
               else "not pinned (taskset missing or one CPU)")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, {args.rounds} "
          f"alternating rounds, daemon with {args.workers} worker(s), loopback, {pinning}; "
          "every round's figure, then the median")
    print("| server | CPU µs per request | median | requests/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    rows = [("no-op aiohttp handler", noop)] + [(str(tree), rs) for tree, rs in daemons.items()]
    for name, rs in rows:
        print(f"| {name} | {_every(rs, 'cpu_us_per_request', '.1f')} | "
              f"{median(r.cpu_us_per_request for r in rs):.1f} | {_every(rs, 'rps', ',.0f')} | "
              f"{_every(rs, 'p50_ms', '.2f')} | {_every(rs, 'p99_ms', '.2f')} | "
              f"{sum(r.errors for r in rs)} |")
    noop_cpu = median(r.cpu_us_per_request for r in noop)
    for tree, rs in daemons.items():
        cpu = median(r.cpu_us_per_request for r in rs)
        print(f"{tree}: no-op/daemon CPU per request {noop_cpu / cpu:.2f}, requests/s "
              f"{median(r.rps for r in rs) / median(r.rps for r in noop):.2f}x the no-op's, "
              f"p99 {median(r.p99_ms for r in rs) / median(r.p99_ms for r in noop):.1f}x")
        if any(r.errors for r in rs):
            print(f"WARNING: {tree}: some requests failed or were not 2xx")
    first = next(iter(daemons.values()))
    cpu = median(r.cpu_us_per_request for r in first)
    print(f"cpu_us_per_request={cpu:.1f} noop_cpu_us_per_request={noop_cpu:.1f} "
          f"ratio={noop_cpu / cpu:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="serve --workers N")
    parser.add_argument("--quick", action="store_true",
                        help="one round of 5 s (under 40 s in all)")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="the daemon of this checkout (with its .venv) instead of this "
                             "one's; repeat to alternate several builds")
    parser.add_argument("--keys", action="store_true",
                        help="instead: API keys (cache hits, misses) against identities "
                             "(bench/http_keys_bench.py)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.rounds = 5, 1, 1
    if args.keys:
        from http_keys_bench import compare
        compare(args)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: run bash scripts/setup.sh bench")
    trees = [tree.resolve() for tree in args.tree] or [ROOT]
    noop: list[Result] = []
    daemons: dict[Path, list[Result]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            port = free_port()
            noop.append(bench_server([sys.executable, str(BENCH / "noop_server.py"), str(port)],
                                     port, args))
            for i, tree in enumerate(trees):
                daemons[tree].append(bench_daemon(tree, Path(tmp), f"{round_}-{i}", args))
    report(args, noop, daemons)


if __name__ == "__main__":
    main()
