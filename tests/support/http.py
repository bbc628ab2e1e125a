"""Helpers for the HTTP tests: serve the real app on a real socket, read Redis, parse headers.

The fixture `serve` (import `serve_fixture` into a test module to use it): `await
serve(config_dict)` builds the app with `create_app(parse_config(...), redis_server.url)` and
serves it as `ratelimitd serve` does (its runner options, the connection guard, the lane of the
decision routes) on a real localhost TCP socket, through pytest-aiohttp's `aiohttp_client`.
Unless the config names its own `[redis] timeout_ms`, the app waits up to TEST_REDIS_TIMEOUT_MS:
the default 100 ms is a production budget, and a test that is not about timeouts must not
fail because two busy cores held Redis back for a tenth of a second.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
import tiktoken
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from yarl import URL

from ratelimitd.config import Config, parse_config
from ratelimitd.http import create_app
from ratelimitd.http.server import (
    SHUTDOWN_TIMEOUT_S,
    ConnectionGuard,
    GuardedSite,
    connection_guard,
    runner_options,
)
from ratelimitd.quota.ids import SEAL_REDIS_KEY
from tests.support.redis_servers import RedisServer

Serve = Callable[..., Awaitable[TestClient[Any, Any]]]

TEST_REDIS_TIMEOUT_MS = 2000

# A well-formed reservation id (24 random characters, primary subject user:u1) never issued.
UNKNOWN_RID = "rsv_" + "A" * 24 + ".dXNlcjp1MQ"

# A tier small enough to exhaust in a few calls; prices known exactly.
SMALL_TIER: dict[str, Any] = {
    "requests_per_minute": 5,
    "tokens_per_day": 2000,
    "daily_budget_usd": 0.05,
    "max_concurrent": 3,
    "max_output_tokens": 300,
}


class DaemonTestServer(TestServer):
    """The app served as a serving process of the daemon serves it (cli/main.py)."""

    def __init__(self, app: web.Application, config: Config) -> None:
        super().__init__(app)
        self.config = config
        self.guard: ConnectionGuard | None = None

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner:
            return
        options = runner_options(self.config.server)
        self.runner = web.AppRunner(self.app, **options)
        await self.runner.setup()
        self.guard = connection_guard(self.config.server, self.app, options)
        self.guard.start()
        sock = self.socket_factory(self.host, 0, socket.AF_INET)
        await GuardedSite(self.runner, self.guard, sock=sock).start()
        self.port = sock.getsockname()[1]
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.guard is not None and not self.closed:
            assert self.guard.lane is not None
            await self.guard.lane.drain(SHUTDOWN_TIMEOUT_S)
            await self.guard.stop()
        await super().close()


@pytest.fixture(name="serve")
def serve_fixture(aiohttp_client: Any, redis_server: RedisServer, redis_client: Redis) -> Serve:
    """Factory: `await serve({...toml as a dict...}, url=...)` -> a client of a live server.

    Depends on redis_client so the shared test Redis is flushed before the app touches it."""

    async def start(data: Mapping[str, Any] | None = None, *, url: str | None = None
                    ) -> TestClient[Any, Any]:
        data = dict(data or {})
        data["redis"] = {"timeout_ms": TEST_REDIS_TIMEOUT_MS, **data.get("redis", {})}
        config = parse_config(data, "<test>")
        app = create_app(config, url if url is not None else redis_server.url)
        client: TestClient[Any, Any] = await aiohttp_client(DaemonTestServer(app, config))
        return client

    return start


async def call(client: TestClient[Any, Any], path: str, body: Any = None, *,
               method: str = "POST", headers: Mapping[str, str] | None = None
               ) -> tuple[ClientResponse, Any]:
    """One request; returns the response and its decoded JSON body."""
    resp = await client.request(method, path, json=body, headers=headers)
    data = await resp.json(content_type=None)
    return resp, data


def assert_error(resp: ClientResponse, body: Any, status: int, code: str,
                 *mentions: str) -> None:
    """The documented error shape, exactly {"error": {"code", "message"}}."""
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message.strip(), body
    for text in mentions:
        assert text in message, (text, message)


async def snapshot(redis: Redis) -> dict[bytes, Any]:
    """Every key with its type and value: equal snapshots mean nothing was written."""
    out: dict[bytes, Any] = {}
    for key in sorted(await redis.keys("*")):
        if key == SEAL_REDIS_KEY.encode():      # made once, not a charge
            continue
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out[key] = ("string", await redis.get(key))
        elif kind == "hash":
            out[key] = ("hash", await redis.hgetall(key))
        else:
            out[key] = (kind, await redis.dump(key))
    return out


def limit_of(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    matches = [lim for lim in body["limits"] if lim["name"] == name]
    assert len(matches) == 1, (name, body["limits"])
    return dict(matches[0])


def nano(usd: float) -> int:
    """USD as shown in JSON -> integer nano-USD, as the engine keeps it."""
    return round(usd * 1_000_000_000)


def cost_nano(input_tokens: int, output_tokens: int, cached: int = 0, *, pi: float,
              po: float, pc: float | None = None) -> int:
    """The documented cost formula, in integer nano-USD (prices in USD per 1M tokens, rounded
    up)."""
    micro_i, micro_o = round(pi * 1e6), round(po * 1e6)
    micro_c = micro_i if pc is None else round(pc * 1e6)
    numerator = (input_tokens - cached) * micro_i + cached * micro_c + output_tokens * micro_o
    return -(-numerator // 1000)


_ITEM = re.compile(r'\s*"(?P<name>[^"\\]*)"(?P<params>(?:;[a-z][a-z0-9_.*-]*=[^;,]+)*)\s*(?:,|$)')
_PARAM = re.compile(r';([a-z][a-z0-9_.*-]*)=("[^"]*"|-?\d+)')


def parse_sf_list(value: str) -> dict[str, dict[str, int | str]]:
    """An RFC 8941 List of String items with parameters, as the IETF RateLimit headers use:
    `"name";q=10;w=60, "other";q=5` -> {"name": {"q": 10, "w": 60}, "other": {"q": 5}}.
    Anything else fails the test."""
    items: dict[str, dict[str, int | str]] = {}
    pos = 0
    while pos < len(value):
        m = _ITEM.match(value, pos)
        assert m is not None and m.end() > pos, f"not a structured-field list: {value!r}"
        params: dict[str, int | str] = {}
        for key, raw in _PARAM.findall(m.group("params")):
            params[key] = raw[1:-1] if raw.startswith('"') else int(raw)
        assert "".join(f";{k}={v}" for k, v in _PARAM.findall(m.group("params"))) \
            == m.group("params"), f"bad parameters in {value!r}"
        items[m.group("name")] = params
        pos = m.end()
    return items


def seconds_up(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def go_duration_ms(text: str) -> int:
    """OpenAI's x-ratelimit-reset-* format ("20ms", "6m0s", "1h2m3s") -> ms."""
    m = re.fullmatch(r"(?:(\d+)ms)|(?:(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s))", text)
    assert m is not None, f"not a duration: {text!r}"
    if m.group(1) is not None:
        return int(m.group(1))
    hours, minutes, secs = (int(g or 0) for g in m.groups()[1:])
    return ((hours * 60 + minutes) * 60 + secs) * 1000


GPT4O = {"input": 2.5, "output": 10.0, "cached_input": 1.25}
RESERVE_KEYS = {"allowed", "reservation_id", "expires_at_ms", "input_tokens",
                "max_output_tokens", "reserved", "limits", "warnings", "duplicate"}


def small(**tier: Any) -> dict[str, Any]:
    """A config with one tier "t" (SMALL_TIER overridden by `tier`) and gpt-4o's prices."""
    return {"tiers": {"t": {**SMALL_TIER, **tier}}, "pricing": {"gpt-4o": GPT4O}}


def rq(**fields: Any) -> dict[str, Any]:
    """A reserve body for user u1 on tier t, model gpt-4o."""
    return {"user": "u1", "tier": "t", "model": "gpt-4o", **fields}


def o200k() -> Any:
    return tiktoken.encoding_for_model("gpt-4o")


def cookbook_count(model: str, messages: list[dict[str, str]]) -> int:
    """OpenAI cookbook's num_tokens_from_messages, with tiktoken's own encoding for the model."""
    encoding = tiktoken.encoding_for_model(model)
    tokens = 3
    for message in messages:
        tokens += 3
        for key, value in message.items():
            tokens += len(encoding.encode(value))
            if key == "name":
                tokens += 1
    return tokens




async def charged_keys(redis: Redis) -> list[bytes]:
    """Every key but the reservation id secret (made once per Redis, not a charge)."""
    return [k for k in await redis.keys("*") if k != SEAL_REDIS_KEY.encode()]
