"""A revocation reaches another daemon within 1 s: through pub/sub (invalidation.py), again
after the subscription was lost, and through the cache ttl alone without it."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from ratelimitd.auth.keys import INVALIDATE_CHANNEL, KeyStore, Pepper, ResolvedKey
from tests.auth.helpers import failure, ok


async def test_a_revocation_reaches_another_daemon_through_pub_sub_within_1s(
        redis_client: Redis, second_client: Redis, pepper: Pepper) -> None:
    admin = KeyStore(redis_client, pepper)
    other = KeyStore(second_client, pepper)          # another daemon: its own cache
    await other.start()
    try:
        assert other.subscribed.is_set()
        key = await admin.create("u1", "free")
        ok(await other.resolve(key.api_key))
        assert len(other.cache) == 1                 # the next resolves are hits
        seen = await _time_until_refused(admin, other, key.key_id, key.api_key)
        print(f"revocation seen by the other daemon after {seen * 1000:.1f} ms (pub/sub)")
        assert seen < 1.0
    finally:
        await other.aclose()


async def test_the_listener_subscribes_again_after_losing_its_connection(
        redis_client: Redis, second_client: Redis, pepper: Pepper) -> None:
    admin = KeyStore(redis_client, pepper)
    other = KeyStore(second_client, pepper)
    await other.start()
    try:
        await redis_client.client_kill_filter(_type="pubsub")
        deadline = time.monotonic() + 3
        while (await redis_client.pubsub_numsub(INVALIDATE_CHANNEL))[0][1] != 1:
            assert time.monotonic() < deadline, "the listener did not subscribe again"
            await asyncio.sleep(0.01)
        await asyncio.wait_for(other.subscribed.wait(), 1)
        key = await admin.create("u1", "free")
        ok(await other.resolve(key.api_key))
        await admin.revoke(key.key_id)
        await asyncio.sleep(0.2)      # far less than the cache ttl: pub/sub did it
        assert failure(await other.resolve(key.api_key)) == "revoked"
    finally:
        await other.aclose()


async def test_a_revocation_reaches_a_daemon_without_pub_sub_within_1s(
        redis_client: Redis, second_client: Redis, pepper: Pepper) -> None:
    admin = KeyStore(redis_client, pepper)
    deaf = KeyStore(second_client, pepper)           # never subscribed: only the cache ttl
    key = await admin.create("u1", "free")
    ok(await deaf.resolve(key.api_key))
    seen = await _time_until_refused(admin, deaf, key.key_id, key.api_key)
    print(f"revocation seen by the other daemon after {seen * 1000:.1f} ms (cache ttl)")
    assert seen < 1.0


async def _time_until_refused(admin: KeyStore, other: KeyStore, key_id: str,
                              api_key: str) -> float:
    # keep the other daemon's entry hot until just before the revocation
    for _ in range(20):
        ok(await other.resolve(api_key))
        await asyncio.sleep(0.01)
    await admin.revoke(key_id)
    start = time.monotonic()
    while isinstance(await other.resolve(api_key), ResolvedKey):
        assert time.monotonic() - start < 2.0, "the revocation never arrived"
        await asyncio.sleep(0.002)
    return time.monotonic() - start
