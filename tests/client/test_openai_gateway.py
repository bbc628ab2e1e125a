"""End to end: the official openai SDK -> examples/openai_gateway.py -> ratelimitd (real Redis)
and an OpenAI-format upstream served here. All of it over real localhost sockets.

The gateway sends the caller's bearer token to ratelimitd as `api_key`, so these tests create
a key with the admin API (`POST /v1/admin/keys`, docs/http-api.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import openai
import pytest
import tiktoken
from aiohttp import web
from aiohttp.test_utils import TestServer

from ratelimitd.client import RatelimitdClient
from tests.client.helpers import config, cost_nano, free_port, process, url_of, usage_of
from tests.support.http import Serve
from tests.support.keys import pepper_env

GATEWAY_PATH = Path(__file__).resolve().parents[2] / "examples" / "openai_gateway.py"
ADMIN_TOKEN, SERVICE_TOKEN = "admin-t0ken-0123456789", "service-t0ken-0123456789"
UPSTREAM_KEY = "upstream-t0ken"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Write a haiku about budgets"}]
NOTHING = {"requests": 0, "tokens": 0, "concurrent": 0, "cost_nano": 0}
USAGE = {"prompt_tokens": 41, "completion_tokens": 17, "total_tokens": 58,
         "prompt_tokens_details": {"cached_tokens": 8}}
STREAM_USAGE = {"prompt_tokens": 33, "completion_tokens": 9, "total_tokens": 42}
STREAMED = ["Hello", " brave", " new", " world"]
ENDLESS_CHUNKS = 500


def load_gateway() -> ModuleType:
    spec = importlib.util.spec_from_file_location("openai_gateway", GATEWAY_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["openai_gateway"] = module
    spec.loader.exec_module(module)
    return module


gateway = load_gateway()


# -- the upstream: an OpenAI-format API that records what it was sent ------------------------------

@dataclass
class Upstream:
    """mode: "ok", "error" (500), "limited" (429), "stream_break" (two chunks, then the
    connection drops) or "endless" (a chunk every 20 ms, up to ENDLESS_CHUNKS, while anyone
    reads them)."""

    mode: str = "ok"
    chunks_sent: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "upstream"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(body)
        self.auth.append(request.headers.get("Authorization", ""))
        if self.mode == "error":
            return web.json_response({"error": {"message": "overloaded", "type": "server_error",
                                                "param": None, "code": None}}, status=500)
        if self.mode == "limited":  # the upstream's own rate limit
            return web.json_response({"error": {"message": "slow down", "type": "requests",
                                                "param": None, "code": "rate_limit_exceeded"}},
                                     status=429, headers={"retry-after": "7"})
        if body.get("stream"):
            return await self.stream(request, body)
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Budgets bloom"}}],
            "usage": USAGE})

    async def stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.mode == "endless":
            return await self.endless(request, response, body)
        pieces = STREAMED[:2] if self.mode == "stream_break" else STREAMED
        for i, text in enumerate(pieces):
            delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
            await response.write(sse(chunk(body, [{"index": 0, "delta": delta,
                                                   "finish_reason": None}])))
        if self.mode == "stream_break":
            assert request.transport is not None
            request.transport.abort()  # mid-stream, no usage, no [DONE]
            return response
        await response.write(sse(chunk(body, [{"index": 0, "delta": {},
                                               "finish_reason": "stop"}])))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(sse(chunk(body, [], STREAM_USAGE)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


    async def endless(self, request: web.Request, response: web.StreamResponse,
                      body: dict[str, Any]) -> web.StreamResponse:
        try:
            for _ in range(ENDLESS_CHUNKS):
                await response.write(sse(chunk(body, [{"index": 0, "delta": {"content": " tok"},
                                                       "finish_reason": None}])))
                self.chunks_sent += 1
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the gateway hung up: generation stops
        return response


def chunk(body: dict[str, Any], choices: list[Any], usage: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 0,
            "model": body["model"], "choices": choices, "usage": usage}


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


# -- the stack -------------------------------------------------------------------------------------

@dataclass
class Stack:
    upstream: Upstream
    daemon_url: str
    upstream_url: str
    gateway_url: str
    rl: RatelimitdClient  # for reading usage back
    sdks: list[openai.AsyncOpenAI] = field(default_factory=list)

    def sdk(self, api_key: str) -> openai.AsyncOpenAI:
        """The official SDK, pointed at the gateway; no retries of its own."""
        client = openai.AsyncOpenAI(api_key=api_key, base_url=f"{self.gateway_url}/v1",
                                    max_retries=0)
        self.sdks.append(client)
        return client

    async def create_key(self, user: str = "e2e", tier: str = "t") -> str:
        """A key made with the admin API (docs/http-api.md)."""
        async with aiohttp.ClientSession() as http, http.post(
                f"{self.daemon_url}/v1/admin/keys", json={"user": user, "tier": tier},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            body = await resp.json(content_type=None)
        assert resp.status == 201, (
            f"POST /v1/admin/keys answered {resp.status} {body}")
        key = body["api_key"]
        assert isinstance(key, str)
        return key


MakeStack = Callable[..., Awaitable[Stack]]
# every daemon of these tests has API keys: the gateway sends the caller's key as api_key
pytestmark = pytest.mark.usefixtures("pepper_env")
__all__ = ["pepper_env"]     # the fixture, imported for usefixtures


@pytest.fixture
async def make_stack(serve: Serve, aiohttp_server: Any) -> AsyncIterator[MakeStack]:
    stacks: list[Stack] = []

    async def make(*, upstream_url: str | None = None, **limits: Any) -> Stack:
        upstream = Upstream()
        daemon = url_of(await serve({**config(**limits), "server": {
            "admin_tokens": [ADMIN_TOKEN], "service_tokens": [SERVICE_TOKEN]}}))
        if upstream_url is None:
            upstream_url = str((await aiohttp_server(upstream.app())).make_url("/v1"))
        server: TestServer = await aiohttp_server(gateway.create_app(
            upstream_url, daemon, SERVICE_TOKEN, UPSTREAM_KEY))
        stack = Stack(upstream, daemon, upstream_url, str(server.make_url("")).rstrip("/"),
                      RatelimitdClient(daemon, service_token=SERVICE_TOKEN))
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for sdk in stack.sdks:
            await sdk.close()
        await stack.rl.close()


async def reserve_count(stack: Stack, **content: Any) -> int:
    """What the daemon counts for a prompt (a dry run: nothing reserved)."""
    probe = await stack.rl.reserve(user="e2e", tier="t", model="gpt-4o", dry_run=True, **content)
    return probe.input_tokens


# -- calls that work -------------------------------------------------------------------------------

async def test_a_call_sends_the_granted_cap_and_commits_the_upstream_usage(
        make_stack: MakeStack) -> None:
    stack = await make_stack()
    sdk = stack.sdk(await stack.create_key())
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=200)  # type: ignore[arg-type]
    reply = raw.parse()
    assert reply.choices[0].message.content == "Budgets bloom"
    sent = stack.upstream.calls[0]
    assert sent["max_tokens"] == 200 and "max_completion_tokens" not in sent
    assert sent["messages"] == MESSAGES
    assert stack.upstream.auth == [f"Bearer {UPSTREAM_KEY}"]  # never the caller's key
    assert raw.headers["x-ratelimit-limit-requests"] == "50"
    assert raw.headers["x-ratelimit-remaining-requests"] == "49"
    assert await usage_of(stack.rl, "e2e") == {
        "requests": 1, "tokens": 58, "concurrent": 0, "cost_nano": cost_nano(41, 17, 8)}


async def test_the_cap_is_the_tiers_when_the_caller_asks_more_or_nothing(
        make_stack: MakeStack) -> None:
    stack = await make_stack()
    sdk = stack.sdk(await stack.create_key())
    await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES,  # type: ignore[arg-type]
                                      max_completion_tokens=5000)
    await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    for sent in stack.upstream.calls:
        assert sent["max_completion_tokens"] == 300 and "max_tokens" not in sent


async def test_the_cap_shrinks_to_the_token_budget_left(make_stack: MakeStack) -> None:
    stack = await make_stack(tokens_per_day=300)
    sdk = stack.sdk(await stack.create_key())
    await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    prompt = await reserve_count(stack, messages=MESSAGES)
    # 58 committed by the first call; the second may use what is left after its prompt
    await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert stack.upstream.calls[1]["max_completion_tokens"] == 300 - 58 - prompt


async def test_a_streamed_call_commits_the_final_usage_chunk(make_stack: MakeStack) -> None:
    stack = await make_stack()
    sdk = stack.sdk(await stack.create_key())
    stream = await sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == "".join(STREAMED)
    assert all(c.choices for c in chunks)  # the usage chunk was the gateway's, not relayed
    sent = stack.upstream.calls[0]
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_completion_tokens"] == 300
    assert await usage_of(stack.rl, "e2e") == {
        "requests": 1, "tokens": 42, "concurrent": 0, "cost_nano": cost_nano(33, 9)}


async def test_a_caller_that_asks_for_usage_gets_the_usage_chunk(make_stack: MakeStack) -> None:
    stack = await make_stack()
    sdk = stack.sdk(await stack.create_key())
    stream = await sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    assert (await usage_of(stack.rl, "e2e"))["tokens"] == 42


async def test_a_broken_stream_commits_what_was_streamed(make_stack: MakeStack) -> None:
    stack = await make_stack()
    stack.upstream.mode = "stream_break"
    sdk = stack.sdk(await stack.create_key())
    received: list[str] = []
    stream = await sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="broke off"):
        async for c in stream:
            received.append(c.choices[0].delta.content or "")
    assert "".join(received) == "Hello brave"
    prompt = await reserve_count(stack, messages=MESSAGES)
    output = len(tiktoken.get_encoding("o200k_base").encode("Hello brave"))
    assert await usage_of(stack.rl, "e2e") == {
        "requests": 1, "tokens": prompt + output, "concurrent": 0,
        "cost_nano": cost_nano(prompt, output)}


async def test_tool_calls_and_tools_are_counted_and_passed_on(make_stack: MakeStack) -> None:
    stack = await make_stack()
    sdk = stack.sdk(await stack.create_key())
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    await sdk.chat.completions.create(model="gpt-4o", messages=messages,  # type: ignore[arg-type]
                                      tools=tools)  # type: ignore[arg-type]
    sent = stack.upstream.calls[0]
    assert sent["tools"] == tools and sent["messages"] == messages  # unchanged upstream
    assert await reserve_count(stack, messages=messages, tools=tools) \
        > await reserve_count(stack, messages=MESSAGES) + 40  # tools and calls were counted


# -- refusals --------------------------------------------------------------------------------------

async def test_over_the_limit_the_sdk_raises_rate_limit_error_with_retry_after(
        make_stack: MakeStack) -> None:
    stack = await make_stack(requests_per_minute=2)
    sdk = stack.sdk(await stack.create_key())
    for _ in range(2):
        await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[arg-type]
                                          messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as err:
        await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[arg-type]
                                          messages=MESSAGES)
    headers = err.value.response.headers
    assert err.value.status_code == 429
    assert 1 <= int(headers["retry-after"]) <= 61
    assert int(headers["retry-after"]) == -(-int(headers["retry-after-ms"]) // 1000)
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert err.value.code == "rate_limit_exceeded"
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "requests"
    assert len(stack.upstream.calls) == 2  # the denied call never reached the upstream


async def test_a_spent_budget_is_insufficient_quota(make_stack: MakeStack) -> None:
    stack = await make_stack(daily_budget_usd=0.0003)  # 300 000 nano-USD
    sdk = stack.sdk(await stack.create_key())
    await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES,  # type: ignore[arg-type]
                                      max_tokens=16)
    with pytest.raises(openai.RateLimitError) as err:
        await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[arg-type]
                                          messages=MESSAGES, max_tokens=16)
    assert err.value.code == "insufficient_quota"


async def test_an_upstream_failure_releases_the_reservation(make_stack: MakeStack) -> None:
    stack = await make_stack()
    stack.upstream.mode = "error"
    sdk = stack.sdk(await stack.create_key())
    with pytest.raises(openai.InternalServerError):
        await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[arg-type]
                                          messages=MESSAGES)
    assert len(stack.upstream.calls) == 1
    assert await usage_of(stack.rl, "e2e") == NOTHING


@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstreams_own_429_is_passed_on_and_releases(
        make_stack: MakeStack, stream: bool) -> None:
    stack = await make_stack()
    stack.upstream.mode = "limited"
    sdk = stack.sdk(await stack.create_key())
    with pytest.raises(openai.RateLimitError) as err:
        await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[call-overload]
                                          messages=MESSAGES, stream=stream)
    assert err.value.response.headers["retry-after"] == "7"
    assert isinstance(err.value.body, dict) and err.value.body["message"] == "slow down"
    assert await usage_of(stack.rl, "e2e") == NOTHING


async def test_an_unreachable_upstream_releases_the_reservation(make_stack: MakeStack) -> None:
    stack = await make_stack(upstream_url=f"http://127.0.0.1:{free_port()}/v1")
    sdk = stack.sdk(await stack.create_key())
    with pytest.raises(openai.APIStatusError) as err:
        await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[arg-type]
                                          messages=MESSAGES)
    assert err.value.status_code == 502
    assert await usage_of(stack.rl, "e2e") == NOTHING


async def test_an_unknown_key_is_an_authentication_error(make_stack: MakeStack) -> None:
    stack = await make_stack()
    await stack.create_key()  # keys exist; this one is not among them
    with pytest.raises(openai.AuthenticationError):
        await stack.sdk("sk-not-a-key").chat.completions.create(
            model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert stack.upstream.calls == []


# -- without ratelimitd's keys ---------------------------------------------------------------------

async def test_models_are_passed_through(make_stack: MakeStack) -> None:
    stack = await make_stack()
    models = await stack.sdk("any").models.list()
    assert [m.id for m in models.data] == ["gpt-4o"]
    assert stack.upstream.calls == []


async def test_no_bearer_token_is_refused_before_anything_is_asked(
        make_stack: MakeStack) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http, http.post(
            f"{stack.gateway_url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES}) as resp:
        body = await resp.json()
    assert resp.status == 401 and body["error"]["code"] == "invalid_api_key"
    assert stack.upstream.calls == []


async def test_a_body_over_the_bound_is_refused_openai_style(make_stack: MakeStack) -> None:
    stack = await make_stack()
    huge = [{"role": "user", "content": "x" * gateway.MAX_BODY_BYTES}]
    async with aiohttp.ClientSession() as http, http.post(
            f"{stack.gateway_url}/v1/chat/completions", headers={"Authorization": "Bearer k"},
            json={"model": "gpt-4o", "messages": huge}) as resp:
        body = await resp.json()
    assert resp.status == 413 and body["error"]["code"] == "request_too_large"
    assert stack.upstream.calls == []


async def test_ratelimitd_down_fails_closed(aiohttp_server: Any) -> None:
    upstream = Upstream()
    upstream_url = str((await aiohttp_server(upstream.app())).make_url("/v1"))
    server = await aiohttp_server(gateway.create_app(
        upstream_url, f"http://127.0.0.1:{free_port()}", None, UPSTREAM_KEY))
    async with openai.AsyncOpenAI(api_key="sk-x", base_url=str(server.make_url("/v1")),
                                  max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[arg-type]
                                              messages=MESSAGES)
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
    assert upstream.calls == []


# -- the command line, as people run it ------------------------------------------------------------

@contextmanager
def gateway_command(stack: Stack) -> Iterator[str]:
    """`python examples/openai_gateway.py ...` as people run it; yields its URL."""
    port = free_port()
    args = [sys.executable, str(GATEWAY_PATH), "--listen", f"127.0.0.1:{port}",
            "--upstream", stack.upstream_url, "--ratelimitd", stack.daemon_url,
            "--service-token", SERVICE_TOKEN]
    with process(args, port, "the gateway", env={"UPSTREAM_API_KEY": UPSTREAM_KEY}):
        yield f"http://127.0.0.1:{port}"


async def test_the_gateway_command_line(make_stack: MakeStack) -> None:
    stack = await make_stack()
    key = await stack.create_key()
    with gateway_command(stack) as url:
        sdk = openai.AsyncOpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
        assert [m.id for m in (await sdk.models.list()).data] == ["gpt-4o"]
        reply = await sdk.chat.completions.create(model="gpt-4o",  # type: ignore[arg-type]
                                                  messages=MESSAGES)
        assert reply.usage is not None and reply.usage.completion_tokens == 17
        await sdk.close()
    assert stack.upstream.auth == [f"Bearer {UPSTREAM_KEY}"]
    assert (await usage_of(stack.rl, "e2e"))["tokens"] == 58


@pytest.mark.parametrize("served", ["in_process", "command_line"])
async def test_a_caller_that_leaves_mid_stream_is_charged_what_it_was_sent(
        make_stack: MakeStack, served: str) -> None:
    """In process, aiohttp's test server cancels the gateway's handler when the caller leaves;
    `web.run_app` (the command line) does not, and the next write fails instead."""
    stack = await make_stack()
    stack.upstream.mode = "endless"
    key = await stack.create_key()
    with gateway_command(stack) if served == "command_line" \
            else nullcontext(stack.gateway_url) as url:
        sdk = openai.AsyncOpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
        stream = await sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.close()
        await sdk.close()
        usage = await settled(stack)
    assert usage["concurrent"] == 0 and usage["requests"] == 1
    assert stack.upstream.chunks_sent < ENDLESS_CHUNKS  # the upstream was hung up on
    output = usage["tokens"] - await reserve_count(stack, messages=MESSAGES)
    # what was streamed, counted (" tok" is one token): not the reserved cap of 300
    assert received <= output <= stack.upstream.chunks_sent < 300


async def settled(stack: Stack) -> dict[str, Any]:
    """The usage once no reservation is in flight: the gateway settles a stream whose caller
    left when it notices (its next write, or its handler's cancellation)."""
    for _ in range(200):  # 10 s at most
        usage = await usage_of(stack.rl, "e2e")
        if not usage["concurrent"]:
            break
        await asyncio.sleep(0.05)
    return usage
