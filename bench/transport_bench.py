"""The hot path's client, measured: today's hand-written pipelined connection against
valkey-glide (Rust core, multiplexed, cluster-aware), on a standalone Redis and on a
3-primary Redis Cluster, all in one run.

Each side drives the real quota engine (reserve + commit of the free-tier-shaped bench tier,
4 limits) with `--concurrency` concurrent callers for `--pairs` pairs, and reports pairs/s and
the client process's CPU time per pair (what the daemon pays per decision, the figure that
matters for a daemon that is CPU-bound; glide's Rust threads count, as they run in the
process). The standalone Redis has a replica, and one more side waits for it after each
settle (`[redis] replicas_ack = 1`): the cost of durable commits.
Rounds alternate the sides so machine noise hits
them alike; every round is printed. Redis and the client share the machine's cores.

Usage: python bench/transport_bench.py [--pairs 20000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from glide import (  # noqa: E402
    GlideClient,
    GlideClientConfiguration,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    NodeAddress,
    ProtocolVersion,
)

from ratelimitd.errors import StoreReplyError, StoreUnavailable  # noqa: E402
from ratelimitd.policy import Identity, Prices, Tier, plan, shorthand_limits  # noqa: E402
from ratelimitd.quota.engine import Engine  # noqa: E402
from ratelimitd.quota.model import ReserveRequest  # noqa: E402
from ratelimitd.store.cluster import ClusterTransport  # noqa: E402
from ratelimitd.store.pipeline import PipelinedConnection  # noqa: E402
from ratelimitd.store.replication import ReplicaAck  # noqa: E402
from ratelimitd.store.transport import PipeTransport, Transport  # noqa: E402
from tests.support.cluster import LocalCluster  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402

PRICES = Prices(input=3_000_000, output=15_000_000, cached_input=1_500_000)
USERS = 1000


class GlideTransport:
    """The Transport protocol over a glide client (bench only: the decision is in
    docs/performance.md)."""

    def __init__(self, client: GlideClient | GlideClusterClient) -> None:
        self.client = client

    async def fcall(self, function: str, args: Sequence[Any]) -> Any:
        numkeys = int(args[0])
        keys = [a if isinstance(a, bytes) else str(a) for a in args[1:1 + numkeys]]
        rest = [a if isinstance(a, bytes) else str(a) for a in args[1 + numkeys:]]
        try:
            return await self.client.fcall(function, keys=keys, arguments=rest)
        except Exception as exc:  # glide's RequestError: an error reply, as the engine expects
            if "not found" in str(exc).lower() or "ERR" in str(exc):
                raise StoreReplyError(str(exc)) from exc
            raise StoreUnavailable(str(exc)) from exc

    async def fcall_acked(self, function: str, args: Sequence[Any]) -> tuple[Any, bool | None]:
        return await self.fcall(function, args), None

    async def load_library(self, source: str) -> None:
        if isinstance(self.client, GlideClusterClient):
            from glide import AllPrimaries
            await self.client.function_load(source, replace=True, route=AllPrimaries())
        else:
            await self.client.function_load(source, replace=True)

    async def has_library(self, name: str) -> bool:
        return True

    async def execute(self, *args: Any) -> Any:
        return await self.client.custom_command([str(a) if not isinstance(a, bytes) else a
                                                 for a in args])

    async def aclose(self) -> None:
        await self.client.close()


async def drive(transport: Transport, pairs: int, concurrency: int) -> tuple[float, float]:
    """(pairs/s, client CPU µs per pair) of reserve + commit pairs."""
    engine = Engine(transport)
    await engine.load_library()
    tier = Tier("bench", shorthand_limits(10**9, 10**12, 10.0**6, 10**6), max_output_tokens=500)
    plans = [plan(tier, Identity(f"user{i}", "bench")) for i in range(USERS)]
    counter = iter(range(pairs))

    async def caller() -> None:
        for i in counter:
            result = await engine.reserve(ReserveRequest(plans[i % USERS], 120, 500, PRICES))
            assert result.allowed and result.reservation_id is not None
            await engine.commit(result.reservation_id, 120, 80)

    await asyncio.gather(*(caller() for _ in range(min(concurrency, 50))))  # warm-up: 50 pairs
    counter = iter(range(pairs))
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await engine.aclose()
    await transport.aclose()
    return pairs / wall, cpu / pairs * 1e6


Side = Callable[[], Awaitable[Transport]]


def sides(standalone: RedisServer, cluster: LocalCluster) -> dict[str, Side]:
    first = cluster.primaries[0].port

    async def pipe() -> Transport:
        return PipeTransport(PipelinedConnection(standalone.url, 5.0), 5.0)

    async def pipe_acked() -> Transport:
        return PipeTransport(PipelinedConnection(standalone.url, 5.0), 5.0,
                             ReplicaAck.for_timeout(1, 1000))

    async def glide_standalone() -> Transport:
        return GlideTransport(await GlideClient.create(GlideClientConfiguration(
            [NodeAddress("127.0.0.1", standalone.port)], request_timeout=5000,
            protocol=ProtocolVersion.RESP2)))

    async def ours_cluster() -> Transport:
        return ClusterTransport(cluster.url, 5.0)

    async def glide_cluster() -> Transport:
        return GlideTransport(await GlideClusterClient.create(GlideClusterClientConfiguration(
            [NodeAddress("127.0.0.1", first)], request_timeout=5000,
            protocol=ProtocolVersion.RESP2)))

    return {"pipelined, standalone": pipe, "glide, standalone": glide_standalone,
            "pipelined, standalone, replicas_ack = 1": pipe_acked,
            "pipelined per primary, cluster": ours_cluster, "glide, cluster": glide_cluster}


async def main_async(args: argparse.Namespace, standalone: RedisServer,
                     cluster: LocalCluster) -> None:
    runs: dict[str, list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for name, make in sides(standalone, cluster).items():
            standalone_client = PipelinedConnection(standalone.url, 5.0)
            await standalone_client.call("FLUSHALL")
            await standalone_client.aclose()
            cluster.flushall()
            result = await drive(await make(), args.pairs, args.concurrency)
            runs.setdefault(name, []).append(result)
            print(f"round {round_ + 1}: {name}: {result[0]:,.0f} pairs/s, "
                  f"{result[1]:.0f} µs client CPU per pair", flush=True)
    print(f"\n{args.pairs} reserve+commit pairs, {args.concurrency} concurrent callers, "
          f"{args.rounds} alternating rounds")
    print("| client | pairs/s (each round) | client CPU µs per pair (each round) |")
    print("|---|---|---|")
    for name, results in runs.items():
        print(f"| {name} | {' / '.join(f'{r[0]:,.0f}' for r in results)} | "
              f"{' / '.join(f'{r[1]:.0f}' for r in results)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        standalone = RedisServer(Path(tmp) / "standalone")
        # every standalone side runs with one replica attached (replicas_ack = 1 waits for it)
        replica = RedisServer(Path(tmp) / "replica",
                              extra=["--replicaof", "127.0.0.1", str(standalone.port)])
        cluster = LocalCluster(Path(tmp) / "cluster", primaries=3)
        try:
            uvloop.run(main_async(args, standalone, cluster))
        finally:
            replica.stop()
            standalone.stop()
            cluster.stop()


if __name__ == "__main__":
    main()
