"""What the metrics (and the request id) cost on the hot path: one daemon process of this
tree against one of another tree without them (a `git archive` of the commit before, given as
--baseline DIR), same wrk load of reserve + commit pairs, alternating rounds so machine noise
hits both. The access log is off in this tree's runs (the baseline had none).

Usage: python bench/metrics_cost.py --baseline /tmp/base [--duration 5] [--rounds 3]
Every run is printed, not only the best: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from http_bench import CONFIG, Result, free_port, on_cpu, run_wrk, start_redis, wait_ready


def bench(python: str, config: Path, port: int, args: argparse.Namespace,
          pythonpath: str | None) -> Result:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath  # ahead of the editable install of this tree
    proc = subprocess.Popen(on_cpu(0, [python, "-m", "ratelimitd", "serve", "--config",
                                       str(config)]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
        run_wrk(port, argparse.Namespace(**{**vars(args), "duration": 2}))  # warm-up
        return run_wrk(port, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", required=True, help="a tree without the metrics")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[Result]] = {"off (baseline)": [], "on (metrics + request id)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, results in runs.items():
                redis, socket = start_redis(Path(tmp) / f"redis-{round_}-{len(results)}-"
                                            f"{name[:2]}")
                try:
                    port = free_port()
                    config = Path(tmp) / "bench.toml"
                    text = CONFIG.format(port=port, socket=socket)
                    if name.startswith("on"):
                        text = text.replace("[redis]", "access_log = false\n[redis]", 1)
                    config.write_text(text)
                    results.append(bench(sys.executable, config, port, args,
                                         args.baseline if name.startswith("off") else None))
                finally:
                    redis.terminate()
                    redis.wait(10)
                r = results[-1]
                print(f"round {round_ + 1} {name}: {r.rps:,.0f} req/s, p50 {r.p50_ms:.2f} ms, "
                      f"p99 {r.p99_ms:.2f} ms, errors {r.errors}", flush=True)
    for name, results in runs.items():
        rps = sorted(r.rps for r in results)
        print(f"{name}: best {rps[-1]:,.0f}, median {rps[len(rps) // 2]:,.0f} req/s")
    off, on = (max(r.rps for r in results) for results in runs.values())
    print(f"best on / best off: {on / off:.3f} ({(1 - on / off) * 100:+.1f} % cost)")


if __name__ == "__main__":
    main()
