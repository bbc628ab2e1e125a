"""Helpers for the API-key tests: two daemons (apps) on one Redis, admin calls, reserves.

Each app is `create_app(...)` served on a real localhost socket by the `serve` fixture; both
use the session's redis-server, so what one daemon writes (a key, a revocation, a block, a
nonce, an auth failure) the other sees only through Redis and pub/sub, as two hosts would.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from tests.support.http import GPT4O, Serve, call

PEPPER = secrets.token_hex(32)
ADMIN_TOKEN = "adm-" + secrets.token_hex(12)
SERVICE_TOKEN = "svc-" + secrets.token_hex(12)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SERVICE = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
Client = TestClient[Any, Any]


@pytest.fixture
def pepper_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every daemon of the test reads this pepper (as from RATELIMITD_KEY_PEPPER)."""
    monkeypatch.setenv("RATELIMITD_KEY_PEPPER", PEPPER)
    return PEPPER


def keys_config(tier: dict[str, Any] | None = None, **sections: dict[str, Any]
                ) -> dict[str, Any]:
    """Service and admin tokens, one tier "t" (60 rpm unless `tier` says), gpt-4o prices."""
    config: dict[str, Any] = {
        "server": {"service_tokens": [SERVICE_TOKEN], "admin_tokens": [ADMIN_TOKEN]},
        "tiers": {"t": {"requests_per_minute": 60, "max_output_tokens": 100, **(tier or {})}},
        "pricing": {"gpt-4o": GPT4O},
        # the tests share two busy CPUs: a call that waits for one must not become a 503
        # (bursts of 100 key lookups open connections at once)
        "redis": {"timeout_ms": 1000},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


async def two_daemons(serve: Serve, config: dict[str, Any]) -> tuple[Client, Client]:
    return await serve(config), await serve(config)


async def admin(client: Client, method: str, path: str, body: Any = None
                ) -> tuple[ClientResponse, Any]:
    return await call(client, path, body, method=method, headers=ADMIN)


async def new_key(client: Client, **fields: Any) -> dict[str, Any]:
    """POST /v1/admin/keys for user u1, tier t (unless `fields` say): the 201 answer."""
    resp, body = await admin(client, "POST", "/v1/admin/keys",
                             {"user": "u1", "tier": "t", **fields})
    assert resp.status == 201, body
    return dict(body)


async def reserve(client: Client, api_key: str | None = None, ip: str | None = None,
                  **fields: Any) -> tuple[ClientResponse, Any]:
    """A reserve of 10 input tokens with `api_key` (or the fields' identity) from `ip`."""
    body: dict[str, Any] = {"model": "gpt-4o", "input_tokens": 10, **fields}
    if api_key is not None:
        body["api_key"] = api_key
    if ip is not None:
        body["attributes"] = {**body.get("attributes", {}), "ip": ip}
    return await call(client, "/v1/reserve", body, headers=SERVICE)


async def redis_dump(redis: Redis) -> list[bytes]:
    """Every key and every value in Redis, as bytes (hash fields, set members, stream
    entries, strings...), for a search of secrets in clear."""
    out: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out.append(await redis.get(key) or b"")
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                out += [field, value]
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "list":
            out += list(await redis.lrange(key, 0, -1))
        elif kind == "stream":
            for _id, entry in await redis.xrange(key):
                for field, value in entry.items():
                    out += [field, value]
        else:
            raise AssertionError(f"{key!r}: type {kind} not searched")
    return out


def assert_absent(secrets_: Iterable[str], haystack: Iterable[bytes], where: str) -> None:
    blobs = list(haystack)
    for secret in secrets_:
        needle = secret.encode()
        assert not any(needle in blob for blob in blobs), f"a secret is in clear in {where}"
