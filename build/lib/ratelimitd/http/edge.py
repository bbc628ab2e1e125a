"""The HTTP edge: the error shape, service tokens, and reading bodies.

Every route is wrapped by `api_handler`, so every failure answers
{"error": {"code", "message"}}: a wrapper on each route rather than an aiohttp middleware,
which aiohttp wraps anew on every request (a measurable share of a request at this daemon's
rates).
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from ratelimitd.errors import ApiError, StoreUnavailable

log = logging.getLogger("ratelimitd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The service tokens of an app (bytes, compared in constant time) and its body bound.
SERVICE_TOKENS: Final = web.AppKey("service_tokens", tuple[bytes, ...])
MAX_BODY_BYTES: Final = web.AppKey("max_body_bytes", int)
# aiohttp's own errors inside a handler (404 and 405 are answered by routes of their own)
_HTTP_CODES: Final = {413: "body_too_large"}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    return json_response({"error": {"code": err.code, "message": err.message}}, err.status,
                         err.headers)


def backend_unavailable() -> ApiError:
    return ApiError(503, "backend_unavailable",
                    "the quota store (Redis) did not answer in time; retry shortly",
                    {"Retry-After": "1"})


def api_handler(handler: Handler) -> Handler:
    """Checks the service token, and turns every failure into the error shape."""

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
                f"body: larger than the {request.app[MAX_BODY_BYTES]} bytes allowed")
            return error_response(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                                           message))
        except StoreUnavailable as exc:
            log.warning("redis unavailable: %s", exc)
            return error_response(backend_unavailable())
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal_error", "internal error; see the logs"))

    return handle


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(404, "not_found", "Not Found")


def method_not_allowed(allowed: str) -> Handler:
    async def answer(request: web.Request) -> web.Response:
        # a 405 must say which methods the resource allows (RFC 9110, 15.5.6)
        raise ApiError(405, "method_not_allowed", "Method Not Allowed", {"Allow": allowed})
    return answer


def _check_service_token(request: web.Request) -> None:
    """Bearer service tokens on /v1/* when configured, compared in constant time."""
    tokens = request.app[SERVICE_TOKENS]
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


async def read_json(request: web.Request) -> Any:
    limit = request.app[MAX_BODY_BYTES]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request", f"body: not valid JSON ({exc})") from exc
