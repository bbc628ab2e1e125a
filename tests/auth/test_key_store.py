"""The key lifecycle against a real redis-server: create, resolve, rotate, revoke, expire, warn;
what Redis holds; what costs a round trip. Other daemons' caches: test_key_invalidation.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from ratelimitd.abuse import AuthFailureGuard, BlockStore
from ratelimitd.auth.keys import (
    KeyFailure,
    KeyInputError,
    KeyNotFoundError,
    KeyPolicy,
    KeyStateError,
    KeyStore,
    Pepper,
    ResolvedKey,
    generate_api_key,
)
from ratelimitd.auth.keys.store import DAY_MS
from ratelimitd.auth.signatures import SignatureVerifier, sign_request
from ratelimitd.policy import Subject
from tests.auth.conftest import PEPPER_TEXT
from tests.auth.helpers import failure, ok
from tests.support.clock import Clock
from tests.support.redis_servers import RedisServer

HOUR_MS = 3_600_000


async def test_a_created_key_resolves_to_its_identity(store: KeyStore, clock: Clock) -> None:
    created = await store.create("u1", "pro", org="acme", expires_in_days=30)
    assert created.api_key.startswith("rlk_") and created.key_id.startswith("key_")
    assert created.expires_at_ms == clock.now + 30 * DAY_MS
    assert created.signing_secret is None
    assert created.api_key not in repr(created)
    key = ok(await store.resolve(created.api_key))
    assert (key.key_id, key.user, key.org, key.tier) == (created.key_id, "u1", "acme", "pro")
    assert key.expires_at_ms == created.expires_at_ms
    assert key.warn_from_ms == created.expires_at_ms - 14 * DAY_MS
    assert key.warnings == () and not key.require_signature
    identity = key.identity({"ip": "203.0.113.9"})
    assert (identity.user, identity.tier, identity.org, identity.key_id) == (
        "u1", "pro", "acme", created.key_id)
    assert identity.attributes == {"ip": "203.0.113.9"}


async def test_a_key_warns_in_its_last_days_then_expires(store: KeyStore, clock: Clock) -> None:
    created = await store.create("u1", "free", expires_in_days=20)
    assert created.expires_at_ms is not None
    clock.advance(6 * DAY_MS - 1)
    assert ok(await store.resolve(created.api_key)).warnings == ()
    clock.advance(1)
    warned = ok(await store.resolve(created.api_key))
    assert [w.code for w in warned.warnings] == ["key_expiring"]
    assert created.key_id in warned.warnings[0].message
    clock.now = created.expires_at_ms - 1
    ok(await store.resolve(created.api_key))
    clock.advance(1)
    assert failure(await store.resolve(created.api_key)) == "expired"
    refused = await store.resolve(created.api_key)
    assert isinstance(refused, KeyFailure)
    assert (refused.status, refused.code) == (403, "key_expired")
    assert (await store.show(created.key_id)).state == "expired"


async def test_keys_older_than_max_age_days_expire_even_if_made_to_last_longer(
        redis_client: Redis, pepper: Pepper, clock: Clock) -> None:
    lenient = KeyStore(redis_client, pepper, KeyPolicy(max_age_days=365), clock=clock)
    created = await lenient.create("u1", "free")
    assert created.expires_at_ms == clock.now + 365 * DAY_MS
    strict = KeyStore(redis_client, pepper, KeyPolicy(max_age_days=30, warn_days=0),
                      clock=clock)
    clock.advance(30 * DAY_MS - 1)
    assert ok(await strict.resolve(created.api_key)).expires_at_ms == clock.now + 1
    clock.advance(1)
    assert failure(await strict.resolve(created.api_key)) == "expired"
    assert isinstance(await lenient.resolve(created.api_key), ResolvedKey)
    no_maximum = KeyStore(redis_client, pepper, KeyPolicy(max_age_days=0), clock=clock)
    forever = await no_maximum.create("u2", "free")
    assert forever.expires_at_ms is None
    clock.advance(10_000 * DAY_MS)
    assert ok(await no_maximum.resolve(forever.api_key)).expires_at_ms is None


async def test_rotation_keeps_the_old_key_for_the_grace_then_refuses_it(
        store: KeyStore, clock: Clock) -> None:
    old = await store.create("u1", "pro", org="acme")
    rotated = await store.rotate(old.key_id, grace_s=600)
    assert rotated.key_id != old.key_id and rotated.api_key != old.api_key
    assert rotated.old_key_id == old.key_id
    assert rotated.old_key_expires_at_ms == clock.now + 600_000
    new = ok(await store.resolve(rotated.api_key))
    assert (new.user, new.org, new.tier) == ("u1", "acme", "pro")
    within = ok(await store.resolve(old.api_key))
    assert within.rotated_to == rotated.key_id
    assert [w.code for w in within.warnings] == ["key_rotated"]
    assert (await store.show(old.key_id)).state == "rotated"
    clock.advance(600_000 - 1)
    ok(await store.resolve(old.api_key))
    clock.advance(1)
    assert failure(await store.resolve(old.api_key)) == "expired"
    ok(await store.resolve(rotated.api_key))
    old_info, new_info = await store.show(old.key_id), await store.show(rotated.key_id)
    assert (old_info.state, old_info.rotated_to) == ("expired", rotated.key_id)
    assert (new_info.state, new_info.rotated_from) == ("active", old.key_id)


async def test_rotation_defaults_to_rotation_grace_s_and_never_extends_a_key(
        store: KeyStore, clock: Clock) -> None:
    old = await store.create("u1", "free")
    rotated = await store.rotate(old.key_id)
    assert rotated.old_key_expires_at_ms == clock.now + 3600 * 1000   # policy fixture
    short = await store.create("u2", "free", expires_in_days=1)
    assert short.expires_at_ms is not None
    clock.advance(DAY_MS - 1000)
    cut = await store.rotate(short.key_id, grace_s=7200)
    assert cut.old_key_expires_at_ms == short.expires_at_ms
    # the new key gets the old one's lifetime
    assert cut.expires_at_ms == clock.now + DAY_MS


async def test_rotation_refuses_rotated_revoked_expired_and_unknown_keys(
        store: KeyStore, clock: Clock) -> None:
    key = await store.create("u1", "free")
    await store.rotate(key.key_id)
    with pytest.raises(KeyStateError) as again:
        await store.rotate(key.key_id)
    assert again.value.code == "key_rotated"
    revoked = await store.create("u1", "free")
    await store.revoke(revoked.key_id)
    with pytest.raises(KeyStateError) as on_revoked:
        await store.rotate(revoked.key_id)
    assert on_revoked.value.code == "key_revoked"
    short = await store.create("u1", "free", expires_in_days=1)
    clock.advance(DAY_MS)
    with pytest.raises(KeyStateError) as on_expired:
        await store.rotate(short.key_id)
    assert on_expired.value.code == "key_expired"
    with pytest.raises(KeyNotFoundError):
        await store.rotate("key_" + "0" * 17)
    with pytest.raises(KeyInputError) as grace:
        await store.rotate(key.key_id, grace_s=-1)
    assert grace.value.field == "grace_s"


async def test_concurrent_rotations_of_one_key_leave_exactly_one_successor(
        store: KeyStore, redis_client: Redis) -> None:
    key = await store.create("u1", "free")
    results = await asyncio.gather(*(store.rotate(key.key_id) for _ in range(5)),
                                   return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, KeyStateError) for r in results if r not in winners)
    # the losers' new records were deleted: the old key and one successor remain
    assert len([k async for k in redis_client.scan_iter("rlk:*")]) == 2
    assert (await store.show(key.key_id)).rotated_to == winners[0].key_id


async def test_revocation_refuses_the_key_at_once_and_is_idempotent(store: KeyStore) -> None:
    key = await store.create("u1", "free")
    ok(await store.resolve(key.api_key))          # cached now
    assert await store.revoke(key.key_id) is True
    refused = await store.resolve(key.api_key)
    assert isinstance(refused, KeyFailure)
    assert (refused.reason, refused.status, refused.code) == ("revoked", 403, "key_revoked")
    assert await store.revoke(key.key_id) is False
    info = await store.show(key.key_id)
    assert info.state == "revoked" and info.revoked_at_ms is not None
    with pytest.raises(KeyNotFoundError):
        await store.revoke("key_" + "1" * 17)
    with pytest.raises(KeyNotFoundError):
        await store.revoke("not-a-key-id")


async def test_unknown_and_malformed_keys_get_the_same_answer(store: KeyStore,
                                                              pepper: Pepper) -> None:
    await store.create("u1", "free")
    unknown = await store.resolve(generate_api_key())
    malformed = await store.resolve("rlk_" + "a" * 36)
    other_pepper = await KeyStore(store._redis, Pepper(b"z" * 32)).create("u9", "free")
    wrong_pepper = await store.resolve(other_pepper.api_key)
    answers = [(r.status, r.code, r.message) for r in (unknown, malformed, wrong_pepper)
               if isinstance(r, KeyFailure)]
    assert len(answers) == 3 and len(set(answers)) == 1
    assert answers[0][:2] == (401, "invalid_api_key")


async def test_create_checks_its_input(store: KeyStore) -> None:
    bad: list[tuple[dict[str, object], str]] = [
           ({"user": ""}, "user"), ({"user": "u\n1"}, "user"), ({"user": "u" * 257}, "user"),
           ({"tier": "gold"}, "tier"), ({"org": ""}, "org"),
           ({"expires_in_days": 0}, "expires_in_days"),
           ({"expires_in_days": 91}, "expires_in_days"),
           ({"expires_in_days": True}, "expires_in_days"),
           ({"require_signature": "yes"}, "require_signature")]
    for override, field in bad:
        args: dict[str, object] = {"user": "u1", "tier": "free", **override}
        with pytest.raises(KeyInputError) as exc:
            await store.create(**args)  # type: ignore[arg-type]
        assert exc.value.field == field
    assert [k async for k in store._redis.scan_iter("rlk:*")] == []


async def test_show_never_reveals_the_key_its_hash_or_its_secret(store: KeyStore,
                                                                  pepper: Pepper) -> None:
    created = await store.create("u1", "pro", org="acme", require_signature=True)
    info = (await store.show(created.key_id)).to_json()
    assert info == {
        "key_id": created.key_id, "user": "u1", "org": "acme", "tier": "pro",
        "state": "active", "created_at_ms": info["created_at_ms"],
        "expires_at_ms": created.expires_at_ms, "revoked_at_ms": None, "rotated_to": None,
        "rotated_from": None, "require_signature": True}
    text = repr(info)
    assert created.api_key not in text and pepper.key_hash(created.api_key) not in text
    assert created.signing_secret is not None and created.signing_secret not in text
    with pytest.raises(KeyNotFoundError):
        await store.show("key_" + "2" * 17)


async def test_redis_time_decides_expiry_without_a_test_clock(redis_client: Redis,
                                                             pepper: Pepper) -> None:
    real = KeyStore(redis_client, pepper, KeyPolicy())
    created = await real.create("u1", "free", expires_in_days=3)
    seconds, micros = await redis_client.time()
    redis_ms = seconds * 1000 + micros // 1000
    assert created.expires_at_ms is not None
    assert abs(created.expires_at_ms - (redis_ms + 3 * DAY_MS)) < 1000
    ok(await real.resolve(created.api_key))
    await real.rotate(created.key_id, grace_s=0)
    assert failure(await real.resolve(created.api_key)) == "expired"


async def test_a_fetch_that_straddles_an_invalidation_is_not_cached(
        store: KeyStore, redis_client: Redis) -> None:
    key = await store.create("u1", "free")
    epoch = store.cache.epoch
    fetch = asyncio.create_task(store.resolve(key.api_key))
    await asyncio.sleep(0)                     # the fetch is sent...
    store.cache.invalidate(key.key_id)         # ...and an invalidation arrives meanwhile
    ok(await fetch)
    assert store.cache.epoch == epoch + 1 and len(store.cache) == 0


async def test_a_caller_that_gives_up_does_not_fail_the_others(store: KeyStore) -> None:
    key = await store.create("u1", "free")
    impatient = asyncio.create_task(store.resolve(key.api_key))
    patient = asyncio.create_task(store.resolve(key.api_key))
    await asyncio.sleep(0)
    impatient.cancel()
    ok(await patient)
    assert impatient.cancelled() and len(store.cache) == 1


async def test_the_cache_is_bounded(redis_client: Redis, pepper: Pepper) -> None:
    small = KeyStore(redis_client, pepper, cache_size=3)
    keys = [await small.create(f"u{i}", "free") for i in range(5)]
    for key in keys:
        ok(await small.resolve(key.api_key))
    assert len(small.cache) == 3
    with pytest.raises(ValueError, match="at most 1 s"):
        KeyStore(redis_client, pepper, cache_ttl_s=1.5)


async def _commands(client: Redis) -> dict[str, int]:
    """Commands Redis ran since the last CONFIG RESETSTAT (those a script runs included)."""
    stats = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
            if k not in ("cmdstat_info", "cmdstat_config|resetstat")}


# what the resolve script runs inside its one call
ONE_RESOLVE = {"evalsha": 1, "time": 1, "hmget": 1}


async def test_a_miss_costs_one_redis_call_and_a_hit_none(redis_client: Redis,
                                                          pepper: Pepper) -> None:
    keys = KeyStore(redis_client, pepper)
    warm, key = await keys.create("u0", "free"), await keys.create("u1", "free")
    ok(await keys.resolve(warm.api_key))       # the script is loaded now
    await redis_client.config_resetstat()
    ok(await keys.resolve(key.api_key))
    assert await _commands(redis_client) == ONE_RESOLVE
    await redis_client.config_resetstat()
    for _ in range(10):
        ok(await keys.resolve(key.api_key))
    assert await _commands(redis_client) == {}
    await redis_client.config_resetstat()
    assert failure(await keys.resolve(generate_api_key())) == "unknown"
    assert await _commands(redis_client) == ONE_RESOLVE
    keys.cache.clear()
    await redis_client.config_resetstat()
    await asyncio.gather(*(keys.resolve(warm.api_key) for _ in range(20)))
    assert await _commands(redis_client) == ONE_RESOLVE   # concurrent misses share one call
    # a revoked key is never cached: it costs what an unknown key costs, every time
    await keys.revoke(key.key_id)
    for _ in range(3):
        await redis_client.config_resetstat()
        assert failure(await keys.resolve(key.api_key)) == "revoked"
        assert await _commands(redis_client) == ONE_RESOLVE


async def test_malformed_keys_are_refused_without_redis_and_hits_need_none(
        tmp_path: Path, pepper: Pepper) -> None:
    server = RedisServer(tmp_path / "doomed")
    client = Redis.from_url(server.url)
    try:
        keys = KeyStore(client, pepper)
        created = await keys.create("u1", "free")
        ok(await keys.resolve(created.api_key))    # cached for up to 1 s
        server.stop()
        ok(await keys.resolve(created.api_key))    # a hit: Redis is not asked
        typo = created.api_key[:-1] + ("A" if created.api_key[-1] != "A" else "B")
        for bad in (typo, "rlk_" + "0" * 36, "sk-" + "x" * 40, "", None, 7):
            assert failure(await keys.resolve(bad)) == "malformed"
        with pytest.raises(RedisConnectionError):  # a well-formed unknown key needs Redis
            await keys.resolve(generate_api_key())
    finally:
        await client.aclose()
        if server.proc.poll() is None:
            server.stop()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_redis_never_holds_a_key_a_secret_or_the_pepper_in_clear(
        redis_client: Redis, pepper: Pepper, clock: Clock) -> None:
    keys = KeyStore(redis_client, pepper, clock=clock)
    blocks = BlockStore(redis_client, clock=clock)
    guard = AuthFailureGuard(redis_client, blocks, threshold=3, block_s=60)
    verifier = SignatureVerifier(redis_client, max_age_s=300)
    secrets_seen: list[str] = [PEPPER_TEXT]
    hashes: list[str] = []
    for i in range(3):
        created = await keys.create(f"u{i}", "free", org="acme", require_signature=True)
        assert created.signing_secret is not None
        rotated = await keys.rotate(created.key_id)
        assert rotated.signing_secret is not None
        for api_key, secret, key_id in ((created.api_key, created.signing_secret,
                                         created.key_id),
                                        (rotated.api_key, rotated.signing_secret,
                                         rotated.key_id)):
            secrets_seen += [api_key, secret, api_key[4:34]]   # also the random part alone
            hashes.append(pepper.key_hash(api_key))
            resolved = ok(await keys.resolve(api_key))
            assert resolved.signing_secret == secret
            signature = sign_request(secret, "POST", "/v1/chat", b"{}",
                                     timestamp=clock.now // 1000)
            await verifier.verify(signature, secret, key_id, clock.now)
        await keys.revoke(rotated.key_id)
    await blocks.add(Subject("user", "u1"), 60, "manual")
    for _ in range(5):
        await guard.record_failure("198.51.100.7")
    dump = b""
    async for name in redis_client.scan_iter(count=1000):
        kind = _text(await redis_client.type(name))
        if kind == "hash":
            value = repr(await redis_client.hgetall(name)).encode()
        elif kind == "zset":
            value = repr(await redis_client.zrange(name, 0, -1, withscores=True)).encode()
        elif kind == "string":
            value = _text(await redis_client.get(name) or "").encode()
        else:
            raise AssertionError(f"unexpected {kind} {name!r}")
        dump += name + b"\n" + value + b"\n"
    assert dump.count(b"rlk:{") == 6 and dump.count(b"rln:{") == 6
    for hashed in hashes:                      # the reading works: the hashes are there
        assert hashed.encode() in dump
    for secret in secrets_seen:
        assert secret.encode() not in dump, "a secret is stored in clear"
