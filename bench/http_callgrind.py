"""The daemon's instructions per request under the load of bench/http_bench.py, counted by
valgrind's callgrind: free of the machine's noise, so a change of a few percent shows.

Each checkout (`--tree DIR`, default this one) in turn: its daemon runs under callgrind with
counting off while it starts and a warm-up wrk run passes, then counts over one wrk run
(reserve and commit alternating, bench/reserve_commit.lua) and prints its user-space
instructions divided by the requests served. System calls are not counted: the CPU figures of
bench/http_bench.py remain the measure of record. Under valgrind the daemon runs ~50x slower,
so more requests wait at each turn of its event loop than on a real run.

With `--workers N` (serve --workers N, N ≥ 1): callgrind_control does not reach forked
workers, so every process counts from the start of its event loop (--toggle-collect) over two
runs, one --duration long and one three times as long; the difference of their counts over the
difference of the requests they answered (access-log lines) cancels startup and warm-up.
Usage: python bench/http_callgrind.py [--duration 10] [--workers N] [--tree DIR ...]
Needs valgrind (Debian package valgrind) and wrk (bash scripts/setup.sh bench).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from http_bench import CONFIG, ROOT, free_port, run_wrk, start_redis


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120  # valgrind starts Python slowly
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the daemon did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def instructions_per_request(tree: Path, tmp: Path, args: argparse.Namespace) -> float:
    redis, socket = start_redis(tmp / "redis")
    port = free_port()
    config, out, log = tmp / "bench.toml", tmp / "callgrind.out", tmp / "daemon.log"
    config.write_text(CONFIG.format(port=port, socket=socket))
    daemon = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         str(tree / ".venv" / "bin" / "python"), str(tree / ".venv" / "bin" / "ratelimitd"),
         "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        env={**os.environ, "PYTHONPATH": str(tree)})
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", daemon, log)
        run_wrk(port, argparse.Namespace(**{**vars(args), "duration": 5}))
        subprocess.run(["callgrind_control", "-i", "on", str(daemon.pid)], check=True,
                       capture_output=True)
        result = run_wrk(port, args)
        subprocess.run(["callgrind_control", "-i", "off", str(daemon.pid)], check=True,
                       capture_output=True)
    finally:
        daemon.terminate()
        daemon.wait(120)
        redis.terminate()
        redis.wait(10)
    totals = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.M)
    if totals is None:
        raise RuntimeError(f"no totals in {out}")
    return int(totals.group(1)) / max(result.requests, 1)


def counted_run(tree: Path, tmp: Path, args: argparse.Namespace, duration: int
                ) -> tuple[int, int]:
    """(instructions every process ran inside its event loop, access-log lines) of one daemon
    with args.workers workers over a warm-up and a wrk run of `duration` s."""
    tmp.mkdir()
    redis, socket = start_redis(tmp / "redis")
    port = free_port()
    config, log = tmp / "bench.toml", tmp / "daemon.log"
    config.write_text(CONFIG.format(port=port, socket=socket))
    daemon = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=*uv_run",
         f"--callgrind-out-file={tmp}/callgrind.out.%p",
         str(tree / ".venv" / "bin" / "python"), str(tree / ".venv" / "bin" / "ratelimitd"),
         "serve", "--config", str(config), "--workers", str(args.workers)],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"})
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz", daemon, log)
        run_wrk(port, argparse.Namespace(**{**vars(args), "duration": 5}))
        run_wrk(port, argparse.Namespace(**{**vars(args), "duration": duration}))
    finally:
        daemon.terminate()
        daemon.wait(300)
        redis.terminate()
        redis.wait(10)
    total = 0
    for out in tmp.glob("callgrind.out.*"):
        found = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.M)
        total += int(found.group(1)) if found else 0
    return total, log.read_bytes().count(b'"ratelimitd.access"')


def instructions_per_request_forked(tree: Path, tmp: Path, args: argparse.Namespace) -> float:
    short_count, short_lines = counted_run(tree, tmp / "short", args, args.duration)
    long_count, long_lines = counted_run(tree, tmp / "long", args, 3 * args.duration)
    return (long_count - short_count) / max(long_lines - short_lines, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0,
                        help="serve --workers N, counted as the module docstring says")
    parser.add_argument("--tree", type=Path, action="append", default=[])
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install valgrind; bash scripts/setup.sh "
                     "bench for wrk)")
    for tree in [tree.resolve() for tree in args.tree] or [ROOT]:
        with tempfile.TemporaryDirectory() as tmp:
            count = (instructions_per_request_forked(tree, Path(tmp), args) if args.workers
                     else instructions_per_request(tree, Path(tmp), args))
        workers = f" ({args.workers} worker{'s' * (args.workers > 1)})" if args.workers else ""
        print(f"{tree}{workers}: {count:,.0f} instructions per request")


if __name__ == "__main__":
    main()
