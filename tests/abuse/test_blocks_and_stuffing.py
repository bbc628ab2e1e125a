"""Blocks and the credential-stuffing defence against a real redis-server: what an operator
and the reserve path rely on. Blocks are read back three ways: BlockStore, the reserve-side
Lua reader (lua/block.lua, run by Redis), and the raw field."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from ratelimitd.abuse import (
    AuthFailureGuard,
    BlockInputError,
    BlockStore,
    InvalidIpError,
    auth_failure_subject,
    canonical_ip,
    ip_block_subjects,
    ip_prefix,
    subject_key,
)
from ratelimitd.abuse.blocks import INDEX_KEY
from ratelimitd.abuse.stuffing import WINDOW_MS
from ratelimitd.auth.keys import KeyFailure, KeyStore, Pepper, ResolvedKey, generate_api_key
from ratelimitd.policy import Prices, Subject, sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import EngineSettings, ReserveRequest
from ratelimitd.store.transport import BatchTransport
from tests.support.clock import Clock

THRESHOLD = 5
BLOCK_S = 900
PRICES = Prices(input=3_000_000, output=15_000_000, cached_input=1_500_000)


@pytest.fixture
def blocks(redis_client: Redis, clock: Clock) -> BlockStore:
    return BlockStore(redis_client, clock=clock)


@pytest.fixture
def guard(redis_client: Redis, blocks: BlockStore) -> AuthFailureGuard:
    return AuthFailureGuard(redis_client, blocks, THRESHOLD, BLOCK_S)


async def lua_block(client: Redis, subject: Subject, now_ms: int) -> tuple[int, str] | None:
    """What the reserve's Lua sees for this subject at `now_ms`: (block end, reason)."""
    engine = Engine.with_test_clock(BatchTransport(client, None), lambda: now_ms)
    probe = ReserveRequest([(Subject("user", "probe"), [])], 0, 0, PRICES, dry_run=True,
                           guards=[subject])
    blocked = (await engine.reserve(probe)).blocked
    return None if blocked is None else (now_ms + blocked.retry_after_ms, blocked.reason)


# --- addresses ----------------------------------------------------------------------------

def test_addresses_are_canonical_and_prefixes_configurable() -> None:
    assert canonical_ip("::ffff:198.51.100.7") == "198.51.100.7"
    assert canonical_ip("2001:DB8:0:0::1") == "2001:db8::1"
    assert ip_prefix("198.51.100.7") == "198.51.100.0/24"
    assert ip_prefix("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert ip_prefix("198.51.100.7", ipv4_bits=16) == "198.51.0.0/16"
    assert ip_prefix("2001:db8:1:2:3:4:5:6", ipv6_bits=48) == "2001:db8:1::/48"
    assert auth_failure_subject("198.51.100.7") == Subject("ip", "198.51.100.7")
    assert auth_failure_subject("2001:db8::1") == Subject("ip_prefix", "2001:db8::/64")
    assert ip_block_subjects("198.51.100.7") == (Subject("ip", "198.51.100.7"),
                                                  Subject("ip_prefix", "198.51.100.0/24"))


@pytest.mark.parametrize("bad", ["", "1.2.3", "1.2.3.4.5", "example.com", "fe80::1%eth0",
                                 "1.2.3.4/24", None, 7, "9" * 100])
def test_an_unparsable_address_is_an_error(bad: object) -> None:
    with pytest.raises(InvalidIpError, match=r"attributes\.ip"):
        canonical_ip(bad)


# --- credential stuffing ------------------------------------------------------------------

async def test_stuffing_from_one_address_blocks_it_and_not_its_neighbour(
        redis_client: Redis, guard: AuthFailureGuard, blocks: BlockStore, pepper: Pepper,
        clock: Clock) -> None:
    keys = KeyStore(redis_client, pepper, clock=clock)
    valid = await keys.create("u1", "free")
    attacker, neighbour = "198.51.100.7", "198.51.100.8"
    for n in range(1, THRESHOLD + 1):
        assert isinstance(await keys.resolve(generate_api_key()), KeyFailure)
        outcome = await guard.record_failure(attacker)
        assert (outcome.failures, outcome.block, outcome.newly_blocked) == (n, None, False)
    await guard.record_failure(neighbour)
    outcome = await guard.record_failure(attacker)
    assert outcome.newly_blocked and outcome.block is not None
    assert outcome.block.ends_at_ms == clock.now + BLOCK_S * 1000
    # the valid key still resolves, but a reserve from that address meets the block
    assert isinstance(await keys.resolve(valid.api_key), ResolvedKey)
    blocked = await blocks.check(ip_block_subjects(attacker))
    assert blocked is not None and "failed API key lookups" in blocked.reason
    assert await lua_block(redis_client, Subject("ip", attacker), clock.now) == (
        clock.now + BLOCK_S * 1000, blocked.reason)
    assert await blocks.check(ip_block_subjects(neighbour)) is None
    assert await lua_block(redis_client, Subject("ip", neighbour), clock.now) is None
    assert [b.subject for b in await blocks.list()] == [Subject("ip", attacker)]
    # further failures while blocked are not counted: nothing grows during an attack
    for _ in range(50):
        again = await guard.record_failure(attacker)
        assert again.block is not None and not again.newly_blocked and again.failures == 0
    assert not await redis_client.exists(f"{subject_key(Subject('ip', attacker))}:af")
    # the block ends after block_s; the count starts over
    clock.advance(BLOCK_S * 1000)
    assert await blocks.check(ip_block_subjects(attacker)) is None
    assert await lua_block(redis_client, Subject("ip", attacker), clock.now) is None
    assert (await guard.record_failure(attacker)).failures == 1


async def test_two_daemons_count_the_same_address_together(
        redis_client: Redis, second_client: Redis, clock: Clock) -> None:
    a = AuthFailureGuard(redis_client, BlockStore(redis_client, clock=clock), THRESHOLD, 60)
    b = AuthFailureGuard(second_client, BlockStore(second_client, clock=clock), THRESHOLD, 60)
    for i in range(THRESHOLD):
        assert (await (a if i % 2 else b).record_failure("203.0.113.5")).block is None
    assert (await a.record_failure("203.0.113.5")).newly_blocked


async def test_failures_slide_out_of_the_ten_minute_window(guard: AuthFailureGuard,
                                                          clock: Clock) -> None:
    for _ in range(THRESHOLD):
        await guard.record_failure("203.0.113.9")
    clock.advance(WINDOW_MS - 1)
    outcome = await guard.record_failure("203.0.113.9")
    assert outcome.newly_blocked, "all six were within ten minutes"
    for _ in range(THRESHOLD):
        await guard.record_failure("203.0.113.10")
    clock.advance(WINDOW_MS)
    outcome = await guard.record_failure("203.0.113.10")
    assert outcome.failures == 1 and outcome.block is None


async def test_ipv6_failures_count_per_network(guard: AuthFailureGuard, blocks: BlockStore,
                                               clock: Clock) -> None:
    for host in range(1, THRESHOLD + 2):
        outcome = await guard.record_failure(f"2001:db8:aa:bb::{host:x}")
    assert outcome.newly_blocked
    assert outcome.subject == Subject("ip_prefix", "2001:db8:aa:bb::/64")
    assert await blocks.check(ip_block_subjects("2001:db8:aa:bb:ffff::1")) is not None
    assert await blocks.check(ip_block_subjects("2001:db8:aa:bc::1")) is None


async def test_a_threshold_of_zero_turns_the_defence_off(redis_client: Redis,
                                                          blocks: BlockStore) -> None:
    off = AuthFailureGuard(redis_client, blocks, 0, 60)
    for _ in range(100):
        assert (await off.record_failure("203.0.113.1")).block is None
    assert [k async for k in redis_client.scan_iter()] == []


# --- manual blocks ------------------------------------------------------------------------

async def test_manual_blocks_hold_for_their_ttl_and_are_listed(
        redis_client: Redis, blocks: BlockStore, clock: Clock) -> None:
    user = await blocks.add(blocks.subject("user", "u1"), 60, "chargeback")
    device = await blocks.add(blocks.subject("device", "dev-{42}%"), 3600, "fraud ring")
    network = await blocks.add(blocks.subject("ip_prefix", "198.51.100.77"), 30, "abuse")
    assert network.subject == Subject("ip_prefix", "198.51.100.0/24")
    assert user.ends_at_ms == clock.now + 60_000
    assert [b.to_json() for b in await blocks.list()] == [
        {"scope": "ip_prefix", "id": "198.51.100.0/24", "expires_at_ms": clock.now + 30_000,
         "reason": "abuse"},
        {"scope": "user", "id": "u1", "expires_at_ms": clock.now + 60_000,
         "reason": "chargeback"},
        {"scope": "device", "id": "dev-{42}%", "expires_at_ms": clock.now + 3_600_000,
         "reason": "fraud ring"},
    ]
    assert await blocks.get(Subject("user", "u1")) == user
    assert await lua_block(redis_client, device.subject, clock.now) == (
        device.ends_at_ms, "fraud ring")
    assert await blocks.check(ip_block_subjects("198.51.100.3")) == network
    clock.advance(30_000)
    assert await blocks.check(ip_block_subjects("198.51.100.3")) is None
    assert [b.subject.scope for b in await blocks.list()] == ["user", "device"]
    assert await redis_client.zcard(INDEX_KEY) == 2       # the ended one was pruned
    assert await blocks.remove(Subject("user", "u1")) is True
    assert await blocks.remove(Subject("user", "u1")) is False
    assert await blocks.get(Subject("user", "u1")) is None
    assert await lua_block(redis_client, Subject("user", "u1"), clock.now) is None
    assert [b.subject.scope for b in await blocks.list()] == ["device"]
    # adding again replaces the block, shorter or longer
    shorter = await blocks.add(device.subject, 10, "reviewed")
    assert (await blocks.get(device.subject)) == shorter
    assert [b.ends_at_ms for b in await blocks.list(limit=5)] == [clock.now + 10_000]


@pytest.mark.parametrize(("scope", "ident", "field"), [
    ("User", "u1", "scope"), ("", "u1", "scope"), (3, "u1", "scope"),
    ("user", "", "id"), ("user", "a\nb", "id"), ("user", "x" * 257, "id"),
    ("ip", "999.1.1.1", "id"), ("ip_prefix", "198.51.100.0/16", "id"),
    ("ip_prefix", "2001:db8::/48", "id"), ("global", "everyone", "id"),
])
def test_block_subjects_are_checked(blocks: BlockStore, scope: object, ident: object,
                                    field: str) -> None:
    with pytest.raises(BlockInputError) as exc:
        blocks.subject(scope, ident)
    assert exc.value.field == field


async def test_block_ttl_and_reason_are_checked_and_nothing_is_stored(
        redis_client: Redis, blocks: BlockStore) -> None:
    for ttl, reason, field in [(0, "r", "ttl_s"), (True, "r", "ttl_s"), ("60", "r", "ttl_s"),
                               (366 * 86_400, "r", "ttl_s"), (60, "", "reason"),
                               (60, "x" * 201, "reason"), (60, "a\x00b", "reason")]:
        with pytest.raises(BlockInputError) as exc:
            await blocks.add(Subject("user", "u1"), ttl, reason)
        assert exc.value.field == field
    assert [k async for k in redis_client.scan_iter()] == []


# --- living in the engine's hash ----------------------------------------------------------

async def test_a_block_outlives_the_engines_expiry_of_the_hash(
        redis_client: Redis, blocks: BlockStore, clock: Clock) -> None:
    engine = Engine.with_test_clock(BatchTransport(redis_client, None), clock, EngineSettings())
    subject = Subject("user", "u1")
    rpm = sliding("requests_per_minute", "requests", "60s", 10)
    request = ReserveRequest([(subject, [rpm])], 10, 10, PRICES)
    assert (await engine.reserve(request)).allowed
    assert await redis_client.pttl(subject_key(subject)) < 3 * 60_000   # the engine's expiry
    await blocks.add(subject, 7200, "manual")
    assert await redis_client.pttl(subject_key(subject)) > 7200_000
    # the reserve's Lua refuses the subject while the block lasts, and nothing it does cuts
    # the block short
    for _ in range(5):
        clock.advance(5 * 60_000)
        refused = await engine.reserve(request)
        assert not refused.allowed and refused.blocked is not None
        assert refused.blocked.reason == "manual"
        remaining = (await blocks.get(subject))
        assert remaining is not None
        assert refused.blocked.retry_after_ms == remaining.ends_at_ms - clock.now
        assert await redis_client.pttl(subject_key(subject)) >= remaining.ends_at_ms - clock.now
    clock.advance(7200_000)                     # the block is over
    assert (await engine.reserve(request)).allowed
    # and a block never shortens the engine's expiry either
    long_limit = sliding("tokens_per_day", "tokens", "24h", 10**9)
    await engine.reserve(ReserveRequest([(subject, [long_limit])], 10, 10, PRICES))
    before = await redis_client.pttl(subject_key(subject))
    await blocks.add(subject, 60, "short")
    assert await redis_client.pttl(subject_key(subject)) >= before - 1000
