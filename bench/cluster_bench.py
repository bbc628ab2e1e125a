"""One daemon on a 3-primary Redis Cluster against the same daemon on one standalone Redis,
in the same run. Target: cluster throughput >= 0.8x standalone's.

Both Redis setups listen on loopback TCP (as a cluster must), without persistence, and the
daemon gets the same wrk load (bench/reserve_commit.lua: reserve + commit pairs, prompts
counted with tiktoken, 4 limits per reserve) as in http_bench.py. Rounds alternate standalone
and cluster so machine noise hits both; every round is printed, and the ratio of each round's
pair (cluster / standalone of the same round). The daemon has CPU 0; wrk and Redis share CPU 1.

Usage: python bench/cluster_bench.py [--duration 10] [--connections 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from http_bench import Result, bench_server  # noqa: E402

from tests.support.cluster import LocalCluster  # noqa: E402
from tests.support.redis_servers import RedisServer, free_port  # noqa: E402

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
[redis]
url = "{url}"
mode = "{mode}"
timeout_ms = 1000
[tiers.bench]
requests_per_minute = 1000000000
tokens_per_day = 1000000000000
daily_budget_usd = 1000000.0
max_concurrent = 1000000
max_output_tokens = 4000
"""


def run_daemon(tmp: Path, url: str, mode: str, args: argparse.Namespace) -> Result:
    port = free_port()
    config = tmp / f"{mode}.toml"
    config.write_text(CONFIG.format(port=port, url=url, mode=mode))
    daemon = [str(Path(sys.executable).parent / "ratelimitd"), "serve", "--config", str(config)]
    return bench_server(daemon, port, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: run bash scripts/setup.sh bench")
    runs: list[tuple[Result, Result]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        standalone = RedisServer(tmp / "standalone")
        cluster = LocalCluster(tmp / "cluster", primaries=3)
        try:
            for round_ in range(args.rounds):
                standalone_client = cluster.client(standalone)
                standalone_client.flushall()
                cluster.flushall()
                alone = run_daemon(tmp, standalone.url, "standalone", args)
                spread = run_daemon(tmp, cluster.url, "cluster", args)
                runs.append((alone, spread))
                print(f"round {round_ + 1}: standalone {alone.rps:,.0f} req/s "
                      f"(p99 {alone.p99_ms:.2f} ms, {alone.errors} errors), cluster "
                      f"{spread.rps:,.0f} req/s (p99 {spread.p99_ms:.2f} ms, {spread.errors} "
                      f"errors): {spread.rps / alone.rps:.2f}x", flush=True)
        finally:
            standalone.stop()
            cluster.stop()
    print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, one daemon process, "
          f"{args.rounds} alternating rounds")
    print("| Redis | requests/s (each round) | p99 (each round) | errors |")
    print("|---|---|---|---|")
    for name, index in (("standalone (TCP)", 0), ("cluster, 3 primaries", 1)):
        results = [pair[index] for pair in runs]
        print(f"| {name} | {' / '.join(f'{r.rps:,.0f}' for r in results)} | "
              f"{' / '.join(f'{r.p99_ms:.2f} ms' for r in results)} | "
              f"{sum(r.errors for r in results)} |")
    ratios = [spread.rps / alone.rps for alone, spread in runs]
    print(f"cluster / standalone per round: {' / '.join(f'{r:.2f}x' for r in ratios)} "
          f"(target >= 0.8x: met in {sum(r >= 0.8 for r in ratios)} of {len(ratios)})")


if __name__ == "__main__":
    main()
