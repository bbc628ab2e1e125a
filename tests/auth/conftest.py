from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from ratelimitd.auth.keys import KeyPolicy, KeyStore, Pepper
from tests.support.clock import Clock
from tests.support.redis_servers import RedisServer

PEPPER_TEXT = secrets.token_hex(32)


@pytest.fixture
def pepper() -> Pepper:
    return Pepper(PEPPER_TEXT.encode())


@pytest.fixture
def policy() -> KeyPolicy:
    return KeyPolicy(max_age_days=90, warn_days=14, rotation_grace_s=3600)


@pytest.fixture
async def store(redis_client: Redis, pepper: Pepper, policy: KeyPolicy,
                clock: Clock) -> AsyncIterator[KeyStore]:
    keys = KeyStore(redis_client, pepper, policy, clock=clock, known_tiers={"free", "pro"})
    yield keys
    await keys.aclose()


@pytest.fixture
async def second_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """Another daemon's own connection to the same Redis."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()
