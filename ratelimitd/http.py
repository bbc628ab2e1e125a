"""The HTTP API of API.md on aiohttp: thin handlers over the engine.

Handlers parse (schema.py), resolve the tier, price and count, ask the engine, and shape the
answer; quota decisions are made in lua/ through engine.py only.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from ratelimitd.backend import connect, pipelined
from ratelimitd.config import Config, resolve_secret
from ratelimitd.engine import Engine, EngineSettings, LimitState, ReserveRequest, ReserveResult
from ratelimitd.errors import ApiError, invalid
from ratelimitd.headers import ratelimit_headers
from ratelimitd.openapi import openapi_spec
from ratelimitd.policy import Identity, Limit, plan
from ratelimitd.pricing import PriceTable, nano_to_usd
from ratelimitd.schema import (
    ReserveBody,
    has_content,
    parse_commit,
    parse_release,
    parse_reserve,
    prompt_chars,
)
from ratelimitd.scripts import RedisClient
from ratelimitd.tokens import TokenCounter, TokenCountError

log = logging.getLogger("ratelimitd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Services:
    """What handlers share; built at startup and closed at shutdown (cleanup_ctx)."""

    config: Config
    redis: RedisClient
    engine: Engine
    counter: TokenCounter
    prices: PriceTable
    executor: ThreadPoolExecutor
    service_tokens: tuple[bytes, ...]


CONFIG: Final = web.AppKey("config", Config)
REDIS_URL: Final = web.AppKey("redis_url", str)
SERVICES: Final = web.AppKey("services", Services)
# aiohttp's own errors inside a handler (404 and 405 are answered by routes of their own)
_HTTP_CODES: Final = {413: "body_too_large"}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    return json_response({"error": {"code": err.code, "message": err.message}}, err.status,
                         err.headers)


def api_handler(handler: Handler) -> Handler:
    """Checks the service token, and turns every failure into {"error": {"code", "message"}}.

    A wrapper on each route rather than an aiohttp middleware, which aiohttp wraps anew on
    every request (a measurable share of a request at this daemon's rates)."""

    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            _check_service_token(request)
            return await handler(request)
        except ApiError as err:
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.reason if exc.status != 413 else (
                f"body: larger than the {request.app[CONFIG].server.max_body_bytes} bytes allowed")
            return error_response(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                                           message))
        except RedisError as exc:
            log.warning("redis unavailable: %s", type(exc).__name__)
            return error_response(_backend_unavailable())
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal_error", "internal error; see the logs"))

    return handle


async def _not_found(request: web.Request) -> web.Response:
    raise ApiError(404, "not_found", "Not Found")


def _method_not_allowed(allowed: str) -> Handler:
    async def answer(request: web.Request) -> web.Response:
        # a 405 must say which methods the resource allows (RFC 9110, 15.5.6)
        raise ApiError(405, "method_not_allowed", "Method Not Allowed", {"Allow": allowed})
    return answer


def _check_service_token(request: web.Request) -> None:
    """Bearer service tokens on /v1/* when configured, compared in constant time."""
    tokens = request.app[SERVICES].service_tokens
    if tokens and request.path.startswith("/v1/"):
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(401, "missing_credentials",
                           "send the service token as Authorization: Bearer <token>",
                           {"WWW-Authenticate": 'Bearer realm="ratelimitd"'})
        candidate = presented.strip().encode()
        matched = False
        for token in tokens:  # compare with every token: timing does not tell which matched
            matched |= hmac.compare_digest(candidate, token)
        if not matched:
            raise ApiError(401, "invalid_service_token", "the service token is not valid",
                           {"WWW-Authenticate": 'Bearer realm="ratelimitd", error="invalid_token"'})


def _backend_unavailable() -> ApiError:
    return ApiError(503, "backend_unavailable",
                    "the quota store (Redis) did not answer in time; retry shortly",
                    {"Retry-After": "1"})


async def read_json(request: web.Request) -> Any:
    limit = request.app[CONFIG].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request", f"body: not valid JSON ({exc})") from exc


# -- reserve ------------------------------------------------------------------------------------

def _display(lim: Limit, amount: int) -> int | float:
    """Amounts at the JSON edge: money in USD, everything else as counted."""
    return nano_to_usd(amount) if lim.metric == "cost_usd" else amount


@functools.lru_cache(maxsize=4096)
def _limit_facts(lim: Limit) -> tuple[tuple[str, Any], ...]:
    """What an answer says of a limit that only changes with the configuration."""
    quota = lim.burst if lim.algorithm == "token_bucket" else lim.limit
    return (("name", lim.name), ("scope", lim.scope), ("metric", lim.metric),
            ("window", lim.window_text if lim.metric != "concurrent" else None),
            ("limit", _display(lim, quota)))


def _limit_json(state: LimitState) -> dict[str, Any]:
    lim = state.limit
    answer = dict(_limit_facts(lim))
    answer["remaining"] = _display(lim, state.remaining)
    answer["reset_ms"] = state.reset_ms
    return answer


async def _input_tokens(services: Services, body: ReserveBody, max_chars: int | None) -> int:
    if body.input_tokens is not None:
        return body.input_tokens
    if not has_content(body):
        field = "prompt" if body.prompt is not None else "messages"
        raise invalid(field, "is empty: it holds no text", "empty_prompt")
    chars = prompt_chars(body)
    if max_chars is not None and chars > max_chars:
        raise invalid("prompt" if body.prompt is not None else "messages",
                      f"{chars} characters; this tier allows {max_chars}", "prompt_too_long")
    try:
        return await services.counter.count_prompt(body.model, body.prompt, body.messages,
                                                   services.executor)
    except TokenCountError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc


async def reserve(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    config = services.config
    body = parse_reserve(await read_json(request))
    tier = config.tiers.get(body.tier)
    if tier is None:
        raise invalid("tier", f"unknown tier {body.tier!r} (known: {', '.join(config.tiers)})")
    prices = services.prices.for_model(body.model)
    if prices is None:
        raise invalid("model", f"unknown model {body.model!r}; its price is not configured",
                      "unknown_model")
    input_tokens = await _input_tokens(services, body, tier.max_prompt_chars)
    if tier.max_input_tokens is not None and input_tokens > tier.max_input_tokens:
        raise invalid("input_tokens", f"{input_tokens} input tokens; this tier allows "
                      f"{tier.max_input_tokens}", "too_many_input_tokens")
    cap = tier.output_cap(body.max_output_tokens, config.reservations.default_max_output_tokens)
    who = Identity(body.user, tier.name, body.org, None, body.attributes or {})
    request_ = ReserveRequest(
        plan(tier, who), input_tokens, cap, prices,
        min_output_tokens=(body.min_output_tokens if body.min_output_tokens is not None
                           else config.reservations.min_output_tokens),
        idempotency_key=body.idempotency_key, dry_run=body.dry_run)
    try:
        result = await services.engine.reserve(request_)
    except RedisError as exc:
        if config.redis.on_error != "allow":
            raise
        log.warning("redis unavailable, admitting by on_error=allow: %s", type(exc).__name__)
        return _degraded_answer(input_tokens, cap)
    return _reserve_answer(result, body.dry_run)


def _reserve_answer(result: ReserveResult, dry_run: bool) -> web.Response:
    limits = [_limit_json(s) for s in result.states]
    headers = ratelimit_headers(result.states, result.retry_after_ms, not result.allowed)
    if not result.allowed:
        assert result.denied_by is not None
        denied = result.denied_by.limit
        answer: dict[str, Any] = {"allowed": False, "reason": denied.name,
                                  "retry_after_ms": result.retry_after_ms, "limits": limits}
        if result.retry_after_ms is None:
            answer["message"] = (f"this call needs more than {denied.name} ever allows; "
                                 "retrying will not help")
        return json_response(answer, 429, headers)
    answer = {"allowed": True, "reservation_id": result.reservation_id or None,
              "expires_at_ms": result.expires_at_ms, "input_tokens": result.input_tokens,
              "max_output_tokens": result.max_output_tokens,
              "reserved": {"requests": 1,
                           "tokens": result.input_tokens + result.max_output_tokens,
                           "cost_usd": nano_to_usd(result.reserved_cost_nano)},
              "limits": limits, "warnings": [], "duplicate": result.duplicate}
    if dry_run:
        answer["dry_run"] = True
    return json_response(answer, 200, headers)


def _degraded_answer(input_tokens: int, cap: int) -> web.Response:
    """[redis] on_error = "allow": admitted without a quota check, and said so."""
    return json_response({
        "allowed": True, "reservation_id": None, "degraded": True, "expires_at_ms": None,
        "input_tokens": input_tokens, "max_output_tokens": cap,
        "reserved": {"requests": 0, "tokens": 0, "cost_usd": 0.0}, "limits": [],
        "warnings": [{"code": "backend_unavailable",
                      "message": "the quota store did not answer; admitted unchecked by "
                                 "on_error = allow, and nothing was charged"}],
        "duplicate": False})


# -- commit / release -----------------------------------------------------------------------------

async def commit(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = parse_commit(await read_json(request))
    output = body.output_tokens
    if output is None:  # output_text: counted with the commit's model, else the default encoding
        text = body.output_text or ""
        output = await services.counter.count_prompt(body.model or "", text, None,
                                                     services.executor) if text else 0
    result = await services.engine.commit(body.reservation_id, body.input_tokens, output,
                                          body.cached_input_tokens)
    if result.status == "not_found":
        raise ApiError(404, "reservation_not_found",
                       "reservation_id: unknown, or expired (reservations live "
                       f"{services.config.reservations.ttl_s} s)")
    if result.status == "conflict":
        raise ApiError(409, "reservation_released",
                       "reservation_id: this reservation was released; it cannot be committed")
    answer: dict[str, Any] = {
        "committed": True, "duplicate": result.status == "duplicate",
        "cost_usd": nano_to_usd(result.cost_nano),
        "usage": {"input_tokens": result.input_tokens,
                  "cached_input_tokens": result.cached_input_tokens,
                  "output_tokens": result.output_tokens},
        "alerts": []}
    over_tokens = result.input_tokens + result.output_tokens - result.reserved_tokens
    over_cost = result.cost_nano - result.reserved_cost_nano
    if over_tokens > 0 or over_cost > 0:
        answer["overrun"] = {"tokens": max(0, over_tokens),
                             "cost_usd": nano_to_usd(max(0, over_cost))}
    return json_response(answer)


async def release(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    rid = parse_release(await read_json(request))
    result = await services.engine.release(rid)
    if result.status == "not_found":
        raise ApiError(404, "reservation_not_found", "reservation_id: unknown, or expired")
    if result.status == "conflict":
        raise ApiError(409, "reservation_committed",
                       "reservation_id: this reservation was committed; it cannot be released")
    return json_response({"released": True, "duplicate": result.status == "duplicate"})


# -- health and description -------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        await services.engine.scripts.ready()
    except RedisError as exc:
        return json_response({"ready": False, "redis": f"unavailable ({type(exc).__name__})"},
                             503)
    return json_response({"ready": True, "redis": "ok", "scripts": "loaded",
                          "config": services.config.source})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_spec())


# -- the application --------------------------------------------------------------------------

async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    client = connect(config.redis, app[REDIS_URL])
    pipe = pipelined(config.redis, app[REDIS_URL])
    engine = Engine(client, EngineSettings(reservation_ttl_ms=config.reservations.ttl_s * 1000,
                                           timezone=config.calendar.timezone,
                                           redis_timeout_ms=config.redis.timeout_ms), pipe)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ratelimitd-tokens")
    app[SERVICES] = Services(
        config=config, redis=client, engine=engine,
        counter=TokenCounter(config.tokens.default_encoding, config.tokens.models),
        prices=PriceTable.from_config(config.pricing), executor=executor,
        service_tokens=tuple(resolve_secret(t).encode() for t in config.server.service_tokens))
    try:
        await engine.scripts.load()
    except RedisError as exc:  # /readyz says so; scripts load on first use
        log.warning("could not load scripts at startup: %s", exc)
    yield
    executor.shutdown(wait=False, cancel_futures=True)
    if pipe is not None:
        await pipe.aclose()
    await client.aclose()


def create_app(config: Config, redis_url: str) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[REDIS_URL] = redis_url
    app.cleanup_ctx.append(_services_ctx)
    routes: tuple[tuple[str, str, Handler], ...] = (
        ("POST", "/v1/reserve", reserve), ("POST", "/v1/commit", commit),
        ("POST", "/v1/release", release), ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz), ("GET", "/openapi.json", openapi))
    for method, path, handler in routes:
        resource = app.router.add_resource(path)
        resource.add_route(method, api_handler(handler))
        resource.add_route("*", api_handler(_method_not_allowed(method)))
    app.router.add_route("*", "/{tail:.*}", api_handler(_not_found))
    return app
