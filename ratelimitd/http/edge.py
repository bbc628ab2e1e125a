"""The HTTP edge: the error shape, service tokens, and reading bodies.

Every route is wrapped by `api_handler`, so every failure answers
{"error": {"code", "message"}}: a wrapper on each route rather than an aiohttp middleware,
which aiohttp wraps anew on every request (a measurable share of a request at this daemon's
rates).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from ratelimitd.auth.bearer import check_admin_token, check_service_token, is_admin_path
from ratelimitd.errors import ApiError, RatelimitdError, StoreUnavailable
from ratelimitd.http.app_keys import LIVE
from ratelimitd.ops.logs import REQUEST_ID_HEADER, ThrottledLog, request_id_from, request_id_var
from ratelimitd.ops.metrics import RouteMetrics


class PlainRequest:
    """A decision request as the lane (lane.py) read it: a POST whose whole body is here, or
    None when it did not come within body_timeout_s."""

    __slots__ = ("app", "body", "headers", "path", "transport")
    method: Final = "POST"

    def __init__(self, app: web.Application, path: str, headers: CIMultiDictProxy[str],
                 body: bytes | None, transport: asyncio.Transport) -> None:
        self.app = app
        self.path = path
        self.headers = headers
        self.body = body
        self.transport = transport


_JSON_TYPE: Final = {"Content-Type": "application/json"}


class JsonAnswer:
    """A decision route's JSON answer, not yet written: the lane (lane.py) writes it straight
    to the socket, aiohttp gets it as a web.Response (`response()`); both write its headers in
    this order, then Content-Length, Date and Server (so `headers` holds none of those)."""

    __slots__ = ("body", "headers", "status")
    keep_alive: Final = None  # never forces its connection closed (a web.Response may)

    def __init__(self, data: Any, status: int = 200, headers: dict[str, str] | None = None
                 ) -> None:
        self.body = orjson.dumps(data)
        self.status = status
        # Content-Type after the answer's own headers, where aiohttp's content_type puts it
        self.headers = {**headers, **_JSON_TYPE} if headers else {**_JSON_TYPE}

    def response(self) -> web.Response:
        return web.Response(body=self.body, status=self.status, headers=self.headers)


# What a decision handler answers: a request aiohttp read, or one the lane read
ApiRequest = web.Request | PlainRequest
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DecisionHandler = Callable[[ApiRequest], Awaitable[JsonAnswer | web.StreamResponse]]
RequestT = TypeVar("RequestT", bound=ApiRequest)
AnswerT = TypeVar("AnswerT", bound=JsonAnswer | web.StreamResponse)
# The body bound of an app (its tokens are in its live services: they are reloaded).
MAX_BODY_BYTES: Final = web.AppKey("max_body_bytes", int)
BODY_TIMEOUT_S: Final = web.AppKey("body_timeout_s", float)
# aiohttp's own errors inside a handler (404 and 405 are answered by routes of their own)
_HTTP_CODES: Final = {413: "body_too_large"}
# Content-Encodings aiohttp decodes without optional packages; any other must not be read as
# plain JSON (RFC 9110 15.5.16: 415 for an unsupported content coding).
_ENCODINGS: Final = frozenset({"", "identity", "gzip", "deflate"})


class ClosingApiError(ApiError):
    """An error after which the connection cannot carry another request (a body left unread
    or undecodable): answered, then closed, so aiohttp does not try to drain the body."""


class ClientGone(RatelimitdError):
    """The client closed the connection before its request was read."""


# Every line a client can trigger (a hang-up, garbage, a 500 and its traceback, a Redis outage
# each request meets) goes through it: one line of a kind every CLIENT_LOG_WINDOW_S, then a
# count of the rest, so a flood of bad requests cannot flood the log
CLIENT_LOG: Final = web.AppKey("client_log", ThrottledLog)
CLIENT_LOG_WINDOW_S: Final = 10.0


def client_log(logger: logging.Logger) -> ThrottledLog:
    return ThrottledLog(logger, per_window=1, window_s=CLIENT_LOG_WINDOW_S)


async def client_log_ctx(app: web.Application) -> AsyncIterator[None]:
    """Summarizes the lines the client log left out, each window and when the app stops."""
    summaries = asyncio.create_task(app[CLIENT_LOG].run())
    yield
    summaries.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await summaries


class EdgeLogger(logging.Logger):
    """The logger aiohttp's protocol reports bad requests and early hang-ups to: what it logs
    as an ERROR with a traceback ("Error handling request", "Unhandled exception") is a
    client's doing, so it becomes a rate-limited INFO line without the traceback."""

    def __init__(self, name: str, parent: logging.Logger) -> None:
        super().__init__(name)
        self.parent = parent
        self._quiet = client_log(self)

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else None
        detail = f": {type(error).__name__}: {error}" if error is not None else ""
        try:
            text = str(msg) % args
        except (TypeError, ValueError):
            text = str(msg)
        self._quiet.log(logging.INFO, "bad_transport", "%s%s", text,
                        detail.replace("\n", " ")[:300])


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


def api_handler(handler: Callable[[RequestT], Awaitable[AnswerT]],
                route: RouteMetrics | None = None
                ) -> Callable[[RequestT], Awaitable[AnswerT | web.StreamResponse]]:
    """Checks the service token, and turns every failure into the error shape; binds the
    request id (the caller's X-Request-Id when sane, else a new one) for every log line about
    the request and returns it on every answer, errors too; `route`: the route's latency and
    status counters, resolved once when it is registered."""

    @functools.wraps(handler)
    async def handle(request: RequestT) -> AnswerT | web.StreamResponse:
        start = time.perf_counter()
        # request_scope without a context manager's generator: this runs on every request
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        scope = request_id_var.set(request_id)
        try:
            # the handler awaited here, not in a coroutine of its own: one layer less a request
            response: AnswerT | web.StreamResponse
            try:
                _check_token(request)
                response = await handler(request)
            except Exception as exc:
                response = _error_answer(request, exc)
            response.headers[REQUEST_ID_HEADER] = request_id
            if route is not None:
                route.observe(response.status, time.perf_counter() - start)
            return response
        finally:
            request_id_var.reset(scope)

    return handle


def served_by_aiohttp(handler: DecisionHandler) -> Handler:
    """A decision route as aiohttp serves it (the requests the lane leaves to it)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        return response.response() if isinstance(response, JsonAnswer) else response

    return answer


def _check_token(request: ApiRequest) -> None:
    """An admin token on /v1/admin/*, the service token (when configured) on the rest of
    /v1/."""
    path = request.path
    if is_admin_path(path):
        services = request.app[LIVE].services
        check_admin_token(request.headers.get("Authorization", ""),
                          services.service_tokens, services.admin_tokens)
    elif path.startswith("/v1/"):
        tokens = request.app[LIVE].services.service_tokens
        if tokens:
            check_service_token(request.headers.get("Authorization", ""), tokens)


def _error_answer(request: ApiRequest, exc: Exception) -> web.StreamResponse:
    """The error shape for what a handler raised; what is not a failure to answer (a
    redirect, a client gone) is raised on."""
    if isinstance(exc, ClosingApiError):
        response = error_response(exc)
        response.force_close()
        return response
    if isinstance(exc, ApiError):
        return error_response(exc)
    if isinstance(exc, ClientGone):
        request.app[CLIENT_LOG].log(logging.INFO, "client_gone",
                                    "client hung up before its request was read: %s", exc)
        raise ConnectionResetError(str(exc)) from None
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        message = exc.reason if exc.status != 413 else (
            f"body: larger than the {request.app[MAX_BODY_BYTES]} bytes allowed")
        return error_response(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                                       message))
    if isinstance(exc, StoreUnavailable):
        request.app[CLIENT_LOG].warning("redis_unavailable", "redis unavailable: %s", exc)
        return error_response(backend_unavailable())
    request.app[CLIENT_LOG].log(logging.ERROR, "internal_error", "unhandled error on %s %s",
                                request.method, request.path, exc_info=True)
    return error_response(ApiError(500, "internal_error", "internal error; see the logs"))


async def not_found(request: ApiRequest) -> web.Response:
    raise ApiError(404, "not_found", "Not Found")


def method_not_allowed(allowed: str) -> Handler:
    async def answer(request: ApiRequest) -> web.Response:
        # a 405 must say which methods the resource allows (RFC 9110, 15.5.6)
        raise ApiError(405, "method_not_allowed", "Method Not Allowed", {"Allow": allowed})
    return answer


def _check_media(request: ApiRequest) -> bool:
    """Whether the body is encoded (gzip, deflate)."""
    headers = request.headers
    content_type = headers.get("Content-Type")
    if content_type is not None and content_type != "application/json":
        media = content_type.partition(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type: {media or 'empty'!r} is not accepted; send "
                           "application/json (or no Content-Type)")
    encoding = headers.get("Content-Encoding")
    if encoding is None:
        return False
    encoding = encoding.strip().lower()
    if encoding not in _ENCODINGS:
        raise ClosingApiError(415, "unsupported_media_type",
                              f"Content-Encoding: {encoding[:40]!r} is not supported; send "
                              "the body plain, gzip or deflate",
                              {"Accept-Encoding": "gzip, deflate"})
    return encoding not in ("", "identity")


async def read_json(request: ApiRequest) -> Any:
    """The request's JSON body: bounded in size (413) and in time (408), its media type and
    content coding checked (415), a body that does not decode refused (400)."""
    encoded = _check_media(request)
    if isinstance(request, PlainRequest):  # read whole, bounded and plain (lane.py)
        if request.body is None:
            raise _body_late(request.app[BODY_TIMEOUT_S])
        return _decode(request.body)
    app = request.app
    limit = app[MAX_BODY_BYTES]
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    timeout_s = app[BODY_TIMEOUT_S]
    content = request.content
    try:
        if content.is_eof() and not encoded:
            # a plain body that came whole with the head, taken as it lies: no coroutine, no
            # copy, no timer (a chunked one has no Content-Length: bounded here)
            raw = content.read_nowait()
            if len(raw) > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
        elif content.is_eof():  # no timer needed
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()
    except TimeoutError:
        raise _body_late(timeout_s) from None
    except RequestPayloadError as exc:
        if request.transport is None or request.transport.is_closing():
            raise ClientGone(str(exc)) from None
        encoding = request.headers.get("Content-Encoding", "")
        raise ClosingApiError(400, "invalid_body",
                              f"body: cannot be read ({encoding or 'plain'}): {exc}") from None
    except ConnectionError as exc:
        raise ClientGone(str(exc) or type(exc).__name__) from None
    return _decode(raw)


def _body_late(timeout_s: float) -> ClosingApiError:
    return ClosingApiError(408, "request_timeout", f"body: not received within {timeout_s:g} s")


def _decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request", f"body: not valid JSON ({exc})") from exc
