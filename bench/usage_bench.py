"""Redis time of reserve and commit with cost alerts and anomaly detection on, against the code
before them, alternating in one session (the machine is shared and noisy).

  python bench/usage_bench.py --baseline 3b198b4 [--rounds 6] [--calls 20000]

extracts the baseline revision (`git archive`) into a temporary directory, starts one
redis-server (pinned to CPU 1 when there are two), and runs, round after round, the baseline's
engine then this tree's, each in a child process of its own (pinned to CPU 0): the free tier's
four limits (a $1M daily budget, so no threshold fires: the path every call takes), 1 000
users, `--calls` reserves then as many commits, under load (64 concurrent callers) and one call
at a time. Server time per call comes from INFO commandstats (FCALL usec). This tree's reserves
check anomalies on the primary subject, and its commits check the three default thresholds.
Prints every round, then each side's median and best. `--callgrind` counts the instructions
Redis runs inside FCALL instead (valgrind; free of the machine's noise), on a test clock that
moves 5 ms a call (so windows move on as often in both runs; the clock skips Redis TIME).
With 1 000 users 5 ms apart, every call moves its windows on; `--users 30 --step-ms 1` puts a
user's calls 30 ms apart, so its minute windows move on about once in 30 calls, as under
bench/engine_bench.py's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
USERS = 1000
CONCURRENCY = 64
STEP_MS = 5


async def _child(port: int, calls: int, users: int = USERS, step_ms: int = STEP_MS
                 ) -> dict[str, float]:
    import dataclasses

    import redis
    from redis.asyncio import Redis

    from ratelimitd.policy import Identity, Prices, Tier, plan, shorthand_limits
    from ratelimitd.quota.engine import Engine
    try:
        from ratelimitd.quota.model import ReserveRequest
    except ImportError:  # a baseline from before the engine's data types moved to model.py
        from ratelimitd.quota.engine import ReserveRequest  # type: ignore[no-redef]
    from ratelimitd.quota.runner import shipped_library
    from ratelimitd.store.transport import BatchTransport

    print(f"library {shipped_library().name}", file=sys.stderr)
    sync = redis.Redis(port=port)
    prices = Prices(input=3_000_000, output=15_000_000, cached_input=1_500_000)
    tier = Tier("bench", shorthand_limits(10**9, 10**12, 10.0**6, 10**6), max_output_tokens=500)
    plans = [plan(tier, Identity(f"user{i}", "bench")) for i in range(users)]
    extra: dict[str, Any] = (
        {"anomaly": True} if "anomaly" in {f.name for f in dataclasses.fields(ReserveRequest)}
        else {})
    out: dict[str, float] = {}
    # Under callgrind, a clock that moves step_ms a call: windows move on as often in both
    # runs, however slowly valgrind runs (with Redis TIME they would move on at every call)
    ticks = [1_764_000_000_000]
    counted = os.environ.get("USAGE_BENCH_CALLGRIND_PID") is not None
    for mode, concurrency in (("loaded", CONCURRENCY), ("sequential", 1)):
        sync.flushall()
        client = Redis(port=port)
        engine = (Engine.with_test_clock(BatchTransport(client, None), lambda: ticks[0])
                  if counted else Engine(BatchTransport(client, None)))
        # a baseline from before Engine.load_library loads through its script runner
        await (engine.load_library() if hasattr(engine, "load_library")
               else engine.scripts.load())
        rids = [""] * calls

        async def reserve(i: int, engine: Engine = engine, rids: list[str] = rids) -> None:
            ticks[0] += step_ms
            result = await engine.reserve(ReserveRequest(plans[i % users], 120, 500, prices,
                                                         **extra))
            assert result.allowed, result
            rids[i] = result.reservation_id

        async def commit(i: int, engine: Engine = engine, rids: list[str] = rids) -> None:
            ticks[0] += step_ms
            await engine.commit(rids[i], 120, 80)

        for name, call in (("reserve", reserve), ("commit", commit)):
            sync.config_resetstat()
            _callgrind("-z")
            await _each(calls, concurrency, call)
            counted = _callgrind("-d")
            stats = sync.info("commandstats").get("cmdstat_fcall", {})
            out[f"{name} {mode}"] = (counted if counted is not None
                                     else int(stats.get("usec", 0))) / calls
        await engine.aclose()
        await client.aclose()
    return out


def _callgrind(action: str) -> int | None:
    """Under --callgrind: zero Redis' counters (-z), or dump them (-d) and return the
    instructions counted since (Ir, every thread); None otherwise."""
    pid = os.environ.get("USAGE_BENCH_CALLGRIND_PID")
    if not pid:
        return None
    before = set(Path(os.environ["USAGE_BENCH_CALLGRIND_DIR"]).iterdir())
    subprocess.run(["callgrind_control", action, pid], check=True, capture_output=True)
    if action != "-d":
        return None
    total = 0
    for dump in set(Path(os.environ["USAGE_BENCH_CALLGRIND_DIR"]).iterdir()) - before:
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total += int(line.split()[1])
                break
    return total


async def _each(calls: int, concurrency: int, call: Any) -> None:
    async def caller(first: int) -> None:
        for i in range(first, calls, concurrency):
            await call(i)
    await asyncio.gather(*(caller(c) for c in range(concurrency)))


def _extract(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(HERE), "archive", revision], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    # the package reads its Lua as ratelimitd.lua: shipped from lua/ (pyproject's package-dir)
    (into / "ratelimitd" / "lua").symlink_to(into / "lua")
    return into


def _run(tree: Path, port: int, args: argparse.Namespace, extra_env: dict[str, str]
         ) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), **extra_env}
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); import asyncio, json; "
            f"sys.path.insert(1, {str(HERE / 'bench')!r}); import usage_bench; "
            f"print(json.dumps(asyncio.run(usage_bench._child({port}, {args.calls}, "
            f"{args.users}, {args.step_ms}))))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, cwd=str(tree))
    if done.returncode:
        raise SystemExit(f"the run of {tree} failed:\n{done.stderr}")
    print(f"  {tree}: {done.stderr.strip()}", flush=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", required=True, help="the revision to compare with")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--step-ms", type=int, default=STEP_MS,
                        help="how far the test clock moves a call, under --callgrind")
    parser.add_argument("--callgrind", action="store_true",
                        help="count Redis' instructions per call (inside FCALL) under "
                             "valgrind's callgrind instead of timing it (free of a shared "
                             "machine's noise)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from tests.support.redis_servers import RedisServer

    runs: dict[str, dict[str, list[float]]] = {"baseline": {}, "alerts+anomaly": {}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "base").mkdir()
        (Path(tmp) / "redis").mkdir()
        base = _extract(args.baseline, Path(tmp) / "base")
        env: dict[str, str] = {}
        if args.callgrind:
            dumps = Path(tmp) / "callgrind"
            dumps.mkdir()
            # only what runs inside FCALL: the scripts and the commands they call, not the
            # event loop's timers (whose share grows with the wall time a run takes)
            server = RedisServer(Path(tmp) / "redis", wrapper=[
                "valgrind", "--tool=callgrind", "--collect-atstart=no",
                "--toggle-collect=fcallCommand", f"--callgrind-out-file={dumps}/cg.%p"])
            env = {"USAGE_BENCH_CALLGRIND_PID": str(server.proc.pid),
                   "USAGE_BENCH_CALLGRIND_DIR": str(dumps)}
        else:
            server = RedisServer(Path(tmp) / "redis")
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(server.proc.pid, {1})
            os.sched_setaffinity(0, {0})
        unit = "instructions" if args.callgrind else "us"
        try:
            for r in range(args.rounds):
                for side, tree in (("baseline", base), ("alerts+anomaly", HERE)):
                    got = _run(tree, server.port, args, env)
                    for key, value in got.items():
                        runs[side].setdefault(key, []).append(value)
                    print(f"round {r + 1} {side:15} " + "  ".join(
                        f"{k} {v:.2f} {unit}" for k, v in got.items()), flush=True)
        finally:
            server.stop()
    print()
    print("| call | baseline median (best) | alerts + anomaly median (best) | change of medians |")
    print("|---|---|---|---|")
    for key in runs["baseline"]:
        old, new = runs["baseline"][key], runs["alerts+anomaly"][key]
        change = statistics.median(new) / statistics.median(old) - 1
        print(f"| {key} | {statistics.median(old):.2f} {unit} ({min(old):.2f}) | "
              f"{statistics.median(new):.2f} {unit} ({min(new):.2f}) | {change:+.1%} |")


if __name__ == "__main__":
    main()
