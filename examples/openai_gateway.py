"""An OpenAI-compatible gateway that asks ratelimitd before every model call.

    UPSTREAM_API_KEY=sk-... python examples/openai_gateway.py --listen 127.0.0.1:8000 \\
        --upstream https://api.openai.com/v1 --ratelimitd http://127.0.0.1:8080 \\
        [--service-token TOKEN]

Callers use it as they use OpenAI, with base_url="http://127.0.0.1:8000/v1" and their
ratelimitd API key as the bearer token (`OpenAI(api_key=..., base_url=...)`). For each
POST /v1/chat/completions the gateway:

  1. reserves: the caller's key, the model, the messages (and tools), the requested cap;
  2. calls the upstream with the granted cap as max_tokens / max_completion_tokens;
  3. commits the upstream's `usage` (a stream: the final usage chunk, which it asks for; a
     stream that broke: the text streamed so far, counted by ratelimitd), or releases the
     reservation when the upstream refused the call or could not be reached.

Limits answer as OpenAI's do: 429, an OpenAI-shaped error body, retry-after and x-ratelimit-*
headers, so SDKs raise RateLimitError and back off by themselves. GET /v1/models is passed
through. The upstream's own key is read from $UPSTREAM_API_KEY, never taken from callers.
Needs aiohttp and ratelimitd's client (`ratelimitd.client`), nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import web

from ratelimitd.client import (
    AuthError,
    Blocked,
    Guard,
    InvalidRequest,
    RatelimitdClient,
    RatelimitdError,
    RateLimited,
)

log = logging.getLogger("openai_gateway")

MAX_BODY_BYTES: Final = 8 * 1024 * 1024
UPSTREAM_TIMEOUT: Final = aiohttp.ClientTimeout(total=600, sock_connect=10)
TOKEN_METRICS: Final = ("tokens", "input_tokens", "output_tokens")
CALLER_KEY_ERRORS: Final = ("invalid_api_key", "key_revoked", "key_expired", "invalid_signature")

RATELIMITD: Final = web.AppKey("ratelimitd", RatelimitdClient)
UPSTREAM: Final = web.AppKey("upstream", str)
UPSTREAM_KEY: Final = web.AppKey("upstream_key", str)
HTTP: Final = web.AppKey("http", aiohttp.ClientSession)


def create_app(upstream: str, ratelimitd: str, service_token: str | None = None,
               upstream_key: str = "") -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[UPSTREAM] = upstream.rstrip("/")
    app[UPSTREAM_KEY] = upstream_key
    app[RATELIMITD] = RatelimitdClient(ratelimitd, service_token=service_token)

    async def clients(app: web.Application) -> AsyncIterator[None]:
        app[HTTP] = aiohttp.ClientSession(timeout=UPSTREAM_TIMEOUT)
        yield
        await app[HTTP].close()
        await app[RATELIMITD].close()

    app.cleanup_ctx.append(clients)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    return app


# -- POST /v1/chat/completions --------------------------------------------------------------------

async def chat_completions(request: web.Request) -> web.StreamResponse:
    api_key = bearer_token(request)
    if api_key is None:
        return openai_error(401, "Missing API key: send it as Authorization: Bearer <key>.",
                            "invalid_request_error", "invalid_api_key")
    try:
        body = await request.json()
    except ValueError:
        return openai_error(400, "The body is not valid JSON.", "invalid_request_error", None)
    except web.HTTPRequestEntityTooLarge:
        return openai_error(413, f"The body is larger than {MAX_BODY_BYTES} bytes.",
                            "invalid_request_error", "request_too_large")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
            or not isinstance(body.get("messages"), list):
        return openai_error(400, "model (a string) and messages (an array) are required.",
                            "invalid_request_error", None)
    # The cap goes upstream under the caller's own name for it (newer models only take
    # max_completion_tokens, which is also the default when the caller set neither).
    cap_field = "max_tokens" if "max_tokens" in body and "max_completion_tokens" not in body \
        else "max_completion_tokens"
    stream = bool(body.get("stream"))
    # No idempotency key from the caller: the client makes one per call (a key the caller
    # chose could replay a settled reservation: calls for free).
    try:
        async with request.app[RATELIMITD].guard(
                api_key=api_key, model=body["model"],
                messages=body["messages"], tools=body.get("tools") or None,
                max_output_tokens=body.get(cap_field)) as call:
            body[cap_field] = call.max_output_tokens
            if stream:
                response, ending, cancelled = await relay_stream(request, body, call)
            else:
                response, ending, cancelled = await relay_json(request, body, call), b"", False
        # Settled (committed or released) by now, so the caller's next call sees the charge;
        # a stream gets its last event only now.
    except RatelimitdError as err:
        return ratelimitd_refusal(err)
    except (aiohttp.ClientError, TimeoutError) as exc:  # the upstream: reservation released
        log.warning("upstream unreachable: %s", exc)
        return openai_error(502, "The upstream API could not be reached.", "server_error",
                            "upstream_unavailable")
    if cancelled:
        raise asyncio.CancelledError  # what was streamed is committed: let the cancel go on
    if stream and response.prepared:
        try:
            await response.write(ending)
            await response.write_eof()
        except ConnectionError:
            pass  # the caller left; what it was sent is committed
    return response


async def relay_json(request: web.Request, body: dict[str, Any], call: Guard) -> web.Response:
    async with upstream_post(request, body) as upstream:
        raw = await upstream.read()
        if upstream.status != 200:
            call.discard()  # the upstream refused the call: release the reservation
            return passed_on(upstream, raw)
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = None  # unreadable: no usage set, so the guard commits the reserved estimate
    if isinstance(reply, dict) and isinstance(reply.get("usage"), dict):
        usage = reply["usage"]
        call.set_usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                       cached_tokens(usage))
    elif isinstance(reply, dict):  # a compatible server that reports no usage: count the text
        call.set_output_text("".join(choice_texts(reply, "message")))
    return web.Response(body=raw, content_type="application/json",
                        headers=openai_headers(call.reservation.headers))


async def relay_stream(request: web.Request, body: dict[str, Any], call: Guard
                       ) -> tuple[web.StreamResponse, bytes, bool]:
    """Relays the upstream's events, all but the last. Returns the response, that last event
    (sent once the usage is committed), and whether the handler was cancelled meanwhile."""
    caller_options = body.get("stream_options")
    if not isinstance(caller_options, dict):
        caller_options = {}
    body["stream_options"] = {**caller_options, "include_usage": True}
    async with upstream_post(request, body) as upstream:
        if upstream.status != 200:
            call.discard()
            return passed_on(upstream, await upstream.read()), b"", False
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            **openai_headers(call.reservation.headers)})
        await response.prepare(request)
        streamed: list[str] = []  # the output so far, to commit if no usage comes
        usage_seen = cancelled = False
        ending = b""
        try:
            async for event in sse_events(upstream.content):
                data = sse_data(event)
                if data == "[DONE]":
                    ending = event
                    break
                chunk = json.loads(data) if data else {}
                if not isinstance(chunk, dict):
                    raise ValueError(f"an event that is not a JSON object: {data[:100]!r}")
                streamed.extend(choice_texts(chunk, "delta"))
                if isinstance(chunk.get("usage"), dict):
                    usage, usage_seen = chunk["usage"], True
                    call.set_usage(usage.get("prompt_tokens", 0),
                                   usage.get("completion_tokens", 0), cached_tokens(usage))
                    if not caller_options.get("include_usage") and not chunk.get("choices"):
                        continue  # the usage chunk the gateway asked for, not the caller
                await send(response, event)
        except CallerGone:
            pass  # closing the upstream connection (leaving this block) stops the generation
        except asyncio.CancelledError:
            # The caller left and aiohttp cancelled this handler (as it does when run with
            # handler_cancellation=True): charge what was sent all the same, then stop.
            cancelled = True
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            # The upstream broke off (or sent garbage): end with an error event, on which
            # the SDKs raise APIError.
            log.warning("upstream stream broke: %s", exc)
            ending = sse_event({"error": {
                "message": "The upstream stream broke off; what was streamed is charged.",
                "type": "server_error", "param": None, "code": "upstream_stream_broken"}})
        if not usage_seen:  # a broken stream, or a server that reports no usage
            call.set_output_text("".join(streamed))  # ratelimitd counts it
        return response, ending, cancelled


class CallerGone(Exception):
    """The caller closed its connection mid-stream."""


async def send(response: web.StreamResponse, event: bytes) -> None:
    try:
        await response.write(event)
    except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
        raise CallerGone from exc


@contextlib.asynccontextmanager
async def upstream_post(request: web.Request, body: Mapping[str, Any]
                        ) -> AsyncIterator[aiohttp.ClientResponse]:
    app = request.app
    headers = {"Authorization": f"Bearer {app[UPSTREAM_KEY]}"} if app[UPSTREAM_KEY] else {}
    async with app[HTTP].post(f"{app[UPSTREAM]}/chat/completions", json=body,
                              headers=headers) as upstream:
        yield upstream


# -- GET /v1/models: passed through ---------------------------------------------------------------

async def models(request: web.Request) -> web.Response:
    key = request.app[UPSTREAM_KEY]
    async with request.app[HTTP].get(f"{request.app[UPSTREAM]}/models", headers=(
            {"Authorization": f"Bearer {key}"} if key else {})) as upstream:
        return passed_on(upstream, await upstream.read())


def passed_on(upstream: aiohttp.ClientResponse, body: bytes) -> web.Response:
    """The upstream's answer as it is, with its retry advice (its own 429s and 503s)."""
    headers = {k: v for k, v in upstream.headers.items()
               if k.lower() in ("retry-after", "retry-after-ms")}
    return web.Response(status=upstream.status, body=body, headers=headers,
                        content_type=upstream.content_type)


# -- what was streamed ----------------------------------------------------------------------

def choice_texts(reply: Mapping[str, Any], part: str) -> list[str]:
    """The output text of a reply's (or a chunk's) choices: content and tool-call arguments."""
    texts: list[str] = []
    for choice in reply.get("choices") or ():
        piece = choice.get(part) or {}
        if isinstance(piece.get("content"), str):
            texts.append(piece["content"])
        for tool_call in piece.get("tool_calls") or ():
            function = tool_call.get("function") or {}
            texts.extend(v for v in (function.get("name"), function.get("arguments"))
                         if isinstance(v, str))
    return texts


def cached_tokens(usage: Mapping[str, Any]) -> int:
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


# -- answers, OpenAI-style ------------------------------------------------------------------------

def ratelimitd_refusal(err: RatelimitdError) -> web.Response:
    """ratelimitd said no (or could not say): answer as OpenAI would."""
    if isinstance(err, RateLimited):
        return rate_limited(err)
    if isinstance(err, AuthError) and err.code in CALLER_KEY_ERRORS:
        return openai_error(401, err.message, "invalid_request_error", "invalid_api_key")
    if isinstance(err, Blocked):
        return openai_error(403, err.message, "invalid_request_error", err.code)
    if isinstance(err, InvalidRequest):
        return openai_error(400, err.message, "invalid_request_error", err.code)
    # ratelimitd is down, or refuses this gateway (its service token): no call without a
    # decision (fail closed; a gateway that prefers to fail open would call upstream here).
    log.error("no decision from ratelimitd: %s", err)
    return openai_error(503, "The rate limiter is unavailable; retry shortly.", "server_error",
                        "rate_limiter_unavailable", {"retry-after": "1"})


def rate_limited(err: RateLimited) -> web.Response:
    denied = err.denied_limit
    metric = denied.metric if denied else "requests"
    if metric == "cost_usd":  # a spending budget: OpenAI says insufficient_quota
        kind, code = "insufficient_quota", "insufficient_quota"
    else:
        kind, code = ("tokens" if metric in TOKEN_METRICS else "requests"), "rate_limit_exceeded"
    headers = openai_headers(err.headers)
    if err.retry_after_ms is None:
        advice = "This request exceeds the limit whatever the wait; make it smaller."
    else:
        advice = f"Please try again in {err.retry_after_ms / 1000:.3g}s."
        headers["retry-after"] = str(math.ceil(err.retry_after_ms / 1000))
        headers["retry-after-ms"] = str(err.retry_after_ms)  # OpenAI's SDKs read this first
    limit = f" (limit {denied.limit}, remaining {denied.remaining})" if denied else ""
    return openai_error(429, f"Rate limit reached on {err.reason}{limit}. {advice}", kind, code,
                        headers)


def openai_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """ratelimitd's x-ratelimit-{limit,remaining,reset}-{requests,tokens}, as OpenAI sends."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


def openai_error(status: int, message: str, kind: str, code: str | None,
                 headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status=status, headers=headers)


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# -- server-sent events ---------------------------------------------------------------------------

async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The upstream's events, each with its lines and the blank line that ends it."""
    event = b""
    async for line in content:
        event += line
        if not line.strip():
            if event.strip():
                yield event
            event = b""
    if event.strip():  # the last event, when the stream ended without a blank line
        yield event + b"\n"


def sse_data(event: bytes) -> str:
    lines = event.decode().splitlines()
    return "\n".join(line[5:].lstrip() for line in lines if line.startswith("data:"))


def sse_event(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


# -- command line ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    parser.add_argument("--upstream", required=True,
                        help="the upstream API's base URL, e.g. https://api.openai.com/v1")
    parser.add_argument("--ratelimitd", required=True, help="ratelimitd's URL")
    parser.add_argument("--service-token", default=os.environ.get("RATELIMITD_SERVICE_TOKEN"),
                        help="ratelimitd's service token (default: $RATELIMITD_SERVICE_TOKEN)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(args.upstream, args.ratelimitd, args.service_token,
                     os.environ.get("UPSTREAM_API_KEY", ""))
    web.run_app(app, host=host.strip("[]") or "127.0.0.1", port=int(port), access_log=None)


if __name__ == "__main__":
    main()
