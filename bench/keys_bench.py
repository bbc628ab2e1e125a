"""What resolving an API key costs the daemon, by outcome, against a fresh local redis-server.

One call at a time (latency as a request sees it, loopback Redis, uvloop): a cache hit, a
miss of a valid key, and the refusals (malformed, unknown, wrong checksum, revoked), whose
times should be alike where the answer is alike; then a signature verification (one SET NX)
and a counted auth failure (one script). Best of 3 rounds of N calls each, median per call.
Usage: python bench/keys_bench.py [--calls N]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratelimitd.abuse import AuthFailureGuard, BlockStore
from ratelimitd.auth.keys import KeyStore, Pepper, generate_api_key
from ratelimitd.auth.signatures import SignatureVerifier, sign_request
from tests.support.redis_servers import RedisServer


async def median_us(calls: int, call: Callable[[int], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(3):
        times = []
        for i in range(calls):
            start = time.perf_counter_ns()
            await call(i)
            times.append(time.perf_counter_ns() - start)
        best = min(best, statistics.median(times) / 1000)
    return best


async def run(url: str, calls: int) -> None:
    client = Redis.from_url(url)
    keys = KeyStore(client, Pepper(secrets.token_bytes(32)))
    valid = [await keys.create(f"u{i}", "free") for i in range(calls)]
    revoked = [await keys.create(f"r{i}", "free") for i in range(calls)]
    for key in revoked:
        await keys.revoke(key.key_id)
    unknown = [generate_api_key() for _ in range(calls)]
    typo = [k[:-1] + ("A" if k[-1] != "A" else "B") for k in unknown]
    await keys.resolve(valid[0].api_key)       # scripts loaded

    async def miss(i: int) -> object:
        keys.cache.clear()
        return await keys.resolve(valid[i].api_key)

    rows = [
        ("hit (valid key, cached)", lambda i: keys.resolve(valid[0].api_key)),
        ("miss (valid key, 1 round trip)", miss),
        ("unknown key (1 round trip)", lambda i: keys.resolve(unknown[i])),
        ("revoked key (1 round trip)", lambda i: keys.resolve(revoked[i].api_key)),
        ("malformed: wrong checksum (no Redis)", lambda i: keys.resolve(typo[i])),
        ("malformed: wrong shape (no Redis)", lambda i: keys.resolve("sk-" + "x" * 45)),
    ]
    verifier = SignatureVerifier(client, 300)
    secret = "rls_" + "ab" * 32
    signatures = [sign_request(secret, "POST", "/v1/chat", b"{}") for _ in range(3 * calls)]
    guard = AuthFailureGuard(client, BlockStore(client), threshold=10**9, block_s=60)
    rows += [
        ("verify a signature (1 SET NX)",
         _counter(lambda n: verifier.verify(signatures[n], secret, "key_x",
                                            time.time_ns() // 1_000_000))),
        ("count an auth failure (1 script)",
         lambda i: guard.record_failure(f"10.{i % 250}.{i // 250 % 250}.1")),
    ]
    print(f"{'resolve / check':40} median us per call ({calls} calls, best of 3)")
    for name, call in rows:
        print(f"{name:40} {await median_us(calls, call):8.1f}")
    # the no-oracle pair, interleaved call by call so machine noise hits both alike
    times: dict[str, list[int]] = {"unknown": [], "revoked": []}
    for i in range(calls):
        for label, key in (("unknown", unknown[i]), ("revoked", revoked[i].api_key)):
            start = time.perf_counter_ns()
            await keys.resolve(key)
            times[label].append(time.perf_counter_ns() - start)
    print("interleaved, median us: " + ", ".join(
        f"{label} {statistics.median(t) / 1000:.1f}" for label, t in times.items()))
    await client.aclose()


def _counter(call: Callable[[int], Awaitable[object]]) -> Callable[[int], Awaitable[object]]:
    """Numbers calls across rounds (each signature may be used once)."""
    state = {"n": 0}

    def numbered(_: int) -> Awaitable[object]:
        state["n"] += 1
        return call(state["n"] - 1)
    return numbered


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        try:
            uvloop.run(run(server.url, args.calls))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
