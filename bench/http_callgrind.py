"""The daemon's instructions per request under the load of bench/http_bench.py, counted by
valgrind's callgrind: free of the machine's noise, so a change of a few percent shows.

Each checkout (`--tree DIR`, default this one) in turn: its daemon runs under callgrind with
counting off while it starts and a warm-up wrk run passes, then counts over one wrk run
(reserve and commit alternating, bench/reserve_commit.lua) and prints its user-space
instructions divided by the requests served. System calls are not counted: the CPU figures of
bench/http_bench.py remain the measure of record. Under valgrind the daemon runs ~50x slower,
so more requests wait at each turn of its event loop than on a real run.
Usage: python bench/http_callgrind.py [--duration 10] [--tree DIR ...]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tree", type=Path, action="append", default=[])
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install valgrind; bash scripts/setup.sh "
                     "bench for wrk)")
    for tree in [tree.resolve() for tree in args.tree] or [ROOT]:
        with tempfile.TemporaryDirectory() as tmp:
            count = instructions_per_request(tree, Path(tmp), args)
        print(f"{tree}: {count:,.0f} instructions per request")


if __name__ == "__main__":
    main()
