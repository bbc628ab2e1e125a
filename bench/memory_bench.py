"""Memory of `ratelimitd serve --workers N`: RSS, PSS and USS (private pages: what each process
holds alone, from /proc/PID/smaps_rollup) of the supervisor and of each worker, after every
worker has served reserve + commit pairs with prompts counted in both bundled encodings.

Usage: python bench/memory_bench.py [--workers 3] [--pairs 300]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from tests.support.redis_servers import RedisServer, free_port  # noqa: E402

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
[redis]
url = "{url}"
timeout_ms = 2000
[tiers.bench]
requests_per_minute = 1000000000
"""


def rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup: Rss, Pss, and Uss = Private_Clean + Private_Dirty."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        result: dict[str, object] = json.load(answer)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        port = free_port()
        config = Path(tmp) / "bench.toml"
        config.write_text(CONFIG.format(port=port, url=redis.url))
        daemon = subprocess.Popen([str(Path(sys.executable).parent / "ratelimitd"), "serve",
                                   "--config", str(config), "--workers", str(args.workers)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{base}/readyz", timeout=2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and daemon.poll() is None
                    time.sleep(0.2)
            models = ("gpt-4o", "gpt-4")   # o200k_base and cl100k_base
            for i in range(args.pairs):     # new connections: the kernel spreads them
                answer = post(f"{base}/v1/reserve", {
                    "user": f"u{i % 50}", "tier": "bench", "model": models[i % 2],
                    "prompt": f"Summarise request {i} of the memory benchmark, please."})
                post(f"{base}/v1/commit", {"reservation_id": answer["reservation_id"],
                                           "input_tokens": 12, "output_tokens": 30})
            children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
            print(f"ratelimitd serve --workers {args.workers}, after {args.pairs} "
                  "reserve+commit pairs (prompts in both encodings)")
            print("| process | RSS MB | PSS MB | USS MB |")
            print("|---|---|---|---|")
            for name, pid in [("supervisor", daemon.pid),
                              *((f"worker {i + 1}", int(c)) for i, c in enumerate(children))]:
                m = rollup(pid)
                print(f"| {name} | {m['rss'] / 1024:.1f} | {m['pss'] / 1024:.1f} | "
                      f"{m['uss'] / 1024:.1f} |")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            redis.stop()


if __name__ == "__main__":
    main()
