"""The decision routes served straight off the socket, beside aiohttp.

aiohttp's request and answer machinery costs about 35 µs of CPU per request on this daemon's
machines, a quarter of what a reserve costs in all. The lane serves the requests gateways send
on every call (POST /v1/reserve, /v1/commit, /v1/release, HTTP/1.1, a Content-Length body, no
Content-Encoding, Expect or Upgrade) with the same handlers (`edge.api_handler`), the same
answers and the same access log, parsed by httptools (llhttp, as aiohttp's own parser).

Everything else goes to aiohttp unchanged: at the first request of a connection that the lane
does not take, the connection is handed to aiohttp's protocol, from that request's first byte
on, and stays with it. So a malformed head, a large one, a chunked or compressed body, any
other route or method gets exactly aiohttp's answer. Requests on one connection are answered
one at a time, in order (pipelined ones wait in the buffer, read no further past a bound).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Final

import httptools
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy

from ratelimitd.errors import ApiError, RatelimitdError
from ratelimitd.http.edge import (
    BODY_TIMEOUT_S,
    MAX_BODY_BYTES,
    DecisionHandler,
    JsonAnswer,
    PlainRequest,
    error_response,
)
from ratelimitd.ops.logs import REQUEST_ID_HEADER, AccessLog

log = logging.getLogger("ratelimitd.http.lane")

# The largest head the lane parses (aiohttp's own bound on one header line): a larger one goes
# to aiohttp, which answers it as it always has.
MAX_HEAD_BYTES: Final = 8190
# While a request is answered, at most this much more is read (pipelined requests, a body)
# before reading pauses until the answer is out.
MAX_WAITING_BYTES: Final = 1 << 16
_HEAD_END: Final = b"\r\n\r\n"
# Headers that make a request aiohttp's: a body the lane does not decode, a 100-continue, an
# upgrade
_NOT_PLAIN: Final = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"})
# The status line and the last header of an answer as aiohttp writes them
_STATUS_LINES: Final = {s.value: f"HTTP/1.1 {s.value} {s.phrase}" for s in HTTPStatus}
_SERVER_LINE: Final = f"Server: {SERVER_SOFTWARE}"


class NotPlain(RatelimitdError):
    """A request the lane leaves to aiohttp."""


class _Head:
    """httptools' callbacks for one request head."""

    __slots__ = ("content_length", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in _NOT_PLAIN:
            raise NotPlain(lowered.decode())
        if lowered == b"content-length":
            if self.content_length is not None:
                raise NotPlain("content-length twice")
            self.content_length = int(value)  # llhttp admits digits only
        self.headers.add(name.decode("utf-8", "surrogateescape"),
                         value.decode("utf-8", "surrogateescape"))


# The decision routes' wrapped handlers by path (app.py registers them with aiohttp too)
LANE_ROUTES: Final = web.AppKey("lane_routes", dict[str, DecisionHandler])


class Lane:
    """The lane of one serving process: its routes, its access log, its connections."""

    def __init__(self, app: web.Application, access_log: AccessLog | None) -> None:
        self.app = app
        self.routes = {path.encode(): (path, handler)
                       for path, handler in app[LANE_ROUTES].items()}
        self.access_log = access_log
        # read once: asyncio.get_running_loop() costs a system call (getpid) each time
        self.loop = asyncio.get_running_loop()
        self.max_body_bytes = app[MAX_BODY_BYTES]
        self.body_timeout_s = app[BODY_TIMEOUT_S]
        self.closing = False
        self._answering: set[asyncio.Task[None]] = set()
        self._idle: set[LaneConnection] = set()

    def connection(self, transport: asyncio.Transport, went_idle: Callable[[], None],
                   hand_over: Callable[[bytes], None]) -> LaneConnection:
        return LaneConnection(self, transport, went_idle, hand_over)

    async def drain(self, timeout_s: float) -> None:
        """Stops taking requests: idle connections close now, busy ones after their answer
        (waited for up to timeout_s); what arrives meanwhile goes to aiohttp, which is stopped
        after this."""
        self.closing = True
        for conn in list(self._idle):
            conn.close()
        if self._answering:
            await asyncio.wait(list(self._answering), timeout=timeout_s)


class _Pending:
    """A request whose head is read and whose body is still coming."""

    __slots__ = ("body_at", "handler", "headers", "keep_alive", "length", "path", "timer")

    def __init__(self, path: str, handler: DecisionHandler, headers: CIMultiDict[str],
                 body_at: int, length: int, keep_alive: bool) -> None:
        self.path = path
        self.handler = handler
        self.headers = headers
        self.body_at = body_at      # where the body starts in the buffer
        self.length = length
        self.keep_alive = keep_alive
        self.timer: asyncio.TimerHandle | None = None


class LaneConnection:
    """One client connection while the lane serves it."""

    __slots__ = ("_buffer", "_busy", "_hand_over", "_lane", "_paused", "_peer", "_pending",
                 "_transport", "_went_idle", "_writing_paused", "active")

    def __init__(self, lane: Lane, transport: asyncio.Transport, went_idle: Callable[[], None],
                 hand_over: Callable[[bytes], None]) -> None:
        self._lane = lane
        self._transport = transport
        self._went_idle = went_idle
        self._hand_over = hand_over
        self._buffer = b""
        self._pending: _Pending | None = None
        self._busy = False
        self._paused = False
        self._writing_paused = False  # the client reads no more: answer no more till it does
        self._peer = _remote(transport)
        self.active = True  # False once handed to aiohttp or closed
        lane._idle.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next()
        if ((self._busy or self._writing_paused) and len(self._buffer) > MAX_WAITING_BYTES
                and not self._paused):
            self._paused = True
            self._transport.pause_reading()

    def _read_on(self) -> None:
        if self._paused:
            self._paused = False
            self._transport.resume_reading()

    def connection_lost(self) -> None:
        self.active = False
        self._lane._idle.discard(self)
        if self._pending is not None and self._pending.timer is not None:
            self._pending.timer.cancel()
        self._pending = None

    def close(self) -> None:
        self.connection_lost()
        self._transport.close()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if not self._busy and self.active:
            self._read_on()
            self._next()

    def _next(self) -> None:
        """Answers the buffer's next request once it is whole, or hands the connection over."""
        if self._writing_paused:
            return
        pending = self._pending or self._head()
        if pending is None:
            return
        end = pending.body_at + pending.length
        buffer = self._buffer
        if len(buffer) < end:
            if pending.timer is None:  # answered 408 if it does not come in time
                pending.timer = self._lane.loop.call_later(self._lane.body_timeout_s,
                                                           self._body_late)
            return
        if pending.timer is not None:
            pending.timer.cancel()
        self._pending = None
        self._buffer = buffer[end:]
        self._start(pending, buffer[pending.body_at:end])

    def _head(self) -> _Pending | None:
        """The buffer's next request head when it is whole and the lane's; else None, and
        when it is not the lane's, the connection is handed to aiohttp."""
        buffer = self._buffer
        end = buffer.find(_HEAD_END, 0, MAX_HEAD_BYTES + len(_HEAD_END))
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                self._give_up()
            return None
        lane = self._lane
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(buffer[:end + len(_HEAD_END)])
            route = lane.routes.get(head.url)
            length = head.content_length
            if (lane.closing or route is None or length is None or parser.get_method() != b"POST"
                    or parser.get_http_version() != "1.1"
                    or length > lane.max_body_bytes):
                raise NotPlain("not a plain decision request")
        except (httptools.HttpParserError, NotPlain, ValueError):
            self._give_up()
            return None
        self._pending = _Pending(route[0], route[1], head.headers, end + len(_HEAD_END), length,
                                 parser.should_keep_alive())
        return self._pending

    def _body_late(self) -> None:
        """The body did not come within body_timeout_s: answered 408 (edge.read_json), and
        the connection closes."""
        pending, self._pending = self._pending, None
        if pending is None or self._busy or not self.active:
            return
        self._buffer = b""
        self._start(pending, None)

    def _start(self, pending: _Pending, body: bytes | None) -> None:
        self._busy = True
        lane = self._lane
        lane._idle.discard(self)
        request = PlainRequest(lane.app, pending.path, CIMultiDictProxy(pending.headers), body,
                               self._transport)
        task = lane.loop.create_task(
            self._answer(pending.handler, request, pending.keep_alive and body is not None))
        lane._answering.add(task)
        task.add_done_callback(lane._answering.discard)

    def _give_up(self) -> None:
        """The connection is aiohttp's from the buffer's first byte on."""
        self.connection_lost()
        buffer, self._buffer = self._buffer, b""
        self._read_on()
        self._hand_over(buffer)

    async def _answer(self, handler: DecisionHandler, request: PlainRequest,
                      keep_alive: bool) -> None:
        loop = self._lane.loop
        start = loop.time()
        try:
            response = await handler(request)
        except Exception:  # api_handler answers every failure; this is a bug's last resort
            log.exception("unhandled error on POST %s", request.path)
            response = error_response(ApiError(500, "internal_error",
                                               "internal error; see the logs"))
        if not self.active:
            return  # the client hung up meanwhile
        keep_alive = keep_alive and response.keep_alive is not False and not self._lane.closing
        data = encode_answer(response, keep_alive)
        self._went_idle()
        self._transport.write(data)
        access_log = self._lane.access_log
        if access_log is not None:
            access_log.entry("POST", request.path, response.status,
                             response.headers.get(REQUEST_ID_HEADER), loop.time() - start,
                             len(data), self._peer)
        if not keep_alive:
            self.close()
            return
        self._busy = False
        self._lane._idle.add(self)
        if not self._writing_paused:
            self._read_on()
        self._next()


def _remote(transport: asyncio.Transport) -> str | None:
    """The client's address as aiohttp's access log shows it."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, list | tuple):
        return str(peer[0])
    return None if peer is None else str(peer)


def encode_answer(response: JsonAnswer | web.StreamResponse, keep_alive: bool) -> bytes:
    """The answer as aiohttp writes it: its headers, then Content-Length, Date, Server."""
    if isinstance(response, JsonAnswer):
        return _encode_json(response, keep_alive)
    assert isinstance(response, web.Response)
    body = response.body
    assert isinstance(body, bytes)
    headers = response.headers
    headers["Content-Length"] = str(len(body))
    if "Date" not in headers:
        headers["Date"] = rfc822_formatted_time()
    headers.setdefault("Server", SERVER_SOFTWARE)
    if not keep_alive and "Connection" not in headers:
        headers["Connection"] = "close"
    return _serialize_headers(
        f"HTTP/1.1 {response.status} {response.reason}", headers) + body


def _encode_json(answer: JsonAnswer, keep_alive: bool) -> bytes:
    """What encode_answer writes for answer.response(), without making one."""
    body = answer.body
    headers = answer.headers
    # a CR or LF in a header would end it early: refused, as aiohttp refuses it (the names
    # are the code's own)
    values = "".join(headers.values())
    if "\n" in values or "\r" in values:
        raise ValueError("newline or carriage return in an answer's header")
    lines = [_STATUS_LINES[answer.status]]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += (f"Content-Length: {len(body)}", f"Date: {rfc822_formatted_time()}", _SERVER_LINE)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
