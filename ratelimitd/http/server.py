"""Connection deadlines and a connection cap for the aiohttp server: the guard it lacks.

aiohttp (3.14) bounds only the idle time between requests (`keepalive_timeout`, started after
a first response); a connection that never sends a byte, sends its head or body at a byte a
second, or promises a Content-Length it never sends stays open forever, and a flood of them
exhausts the process's file descriptors so every other client fails (aiohttp PR #13681 is
still open). This module wraps aiohttp's protocol factory: each connection's protocol sits
behind a `GuardedProtocol` that watches its bytes, and one sweeper closes connections past
their deadline:

- head: from the connection (or the first byte after a response) until the blank line ending
  the request head: `header_timeout_s`;
- body: from the end of the head until the response: `body_timeout_s` (plus a grace, so the
  handler's own 408 answer comes first, see edge.read_json);
- idle: from a response until the next byte: `keepalive_timeout_s`.

Past `max_connections`, a new connection evicts another: the body furthest behind
`min_body_bytes_per_s` (counted from a grace after its head), else the connection idle longest,
else the oldest unfinished head. A body on pace is never evicted; when every connection is one,
the new connection is refused (closed). So connections trickling a body hold their slots only
while nobody else needs them. The cap is kept under the process's open-file limit
(`fit_to_fd_limit`), so the listening socket never fails with EMFILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from ratelimitd.config.model import ServerConfig
from ratelimitd.http.edge import EdgeLogger
from ratelimitd.http.lane import Lane, LaneConnection
from ratelimitd.ops.logs import access_log_of, access_log_options

log = logging.getLogger("ratelimitd.http.server")

# Descriptors kept free beside the client connections: Redis pools (64) and the pipelined
# connection, listening sockets, the log, tiktoken's files.
RESERVED_FDS: Final = 128
# The handler answers a slow body itself with a 408 after body_timeout_s (edge.read_json);
# the guard closes such a connection only if that answer did not come this much later.
BODY_GRACE_S: Final = 5.0
# A body's pace is measured from this long after its head: a request whose head and body come
# in separate writes, or whose handler is still answering, is not behind when it starts.
BODY_PACE_GRACE_S: Final = 1.0
# in-flight requests get this long; the embedded Redis then stops, all within 10 s
SHUTDOWN_TIMEOUT_S: Final = 7.0
_HEAD_END: Final = b"\r\n\r\n"
_HEAD, _BODY, _IDLE = 0, 1, 2
_PHASE_NAMES: Final = ("request head", "request body", "idle keep-alive")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 30.0
    max_connections: int = 4096
    min_body_bytes_per_s: float = 500.0


def runner_options(server: ServerConfig) -> dict[str, Any]:
    """web.AppRunner's keyword arguments for a serving process."""
    return {**access_log_options(server.access_log),
            "shutdown_timeout": SHUTDOWN_TIMEOUT_S,
            # aiohttp reports bad request lines and hang-ups to it: one rate-limited INFO
            # line, no traceback
            "logger": EdgeLogger("ratelimitd.http.edge", logging.getLogger("ratelimitd.http")),
            "keepalive_timeout": server.keepalive_timeout_s,
            # a body left unread (an error answered first) is not drained: the connection
            # closes after the answer
            "lingering_time": 0}


def connection_guard(server: ServerConfig, app: web.Application,
                     options: dict[str, Any]) -> ConnectionGuard:
    """The guard of a serving process's connections, with the lane that serves the decision
    routes (`options`: its runner_options, whose access log the lane writes too)."""
    guard = ConnectionGuard(ConnectionLimits(
        server.header_timeout_s, server.body_timeout_s, server.keepalive_timeout_s,
        fit_to_fd_limit(server.max_connections), server.min_body_bytes_per_s),
        asyncio.get_running_loop())
    guard.lane = Lane(app, access_log_of(options))
    return guard


def fit_to_fd_limit(max_connections: int) -> int:
    """The connection cap this process can honour: raises the soft RLIMIT_NOFILE toward the
    hard one when needed, else lowers the cap (with a warning) to what the limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(1, soft - RESERVED_FDS)
        log.warning("open-file limit %d: serving at most %d connections, not the configured "
                    "max_connections = %d (raise LimitNOFILE / ulimit -n)", soft, fitted,
                    max_connections)
        return fitted
    return max_connections


# Transport methods aiohttp calls, bound once per connection so that a call through the view
# costs no more than one on the transport (a __getattr__ hop on each was measurable).
_DELEGATED: Final = ("is_closing", "get_extra_info", "pause_reading", "resume_reading",
                     "close", "abort", "get_write_buffer_size", "set_write_buffer_limits",
                     "is_reading", "can_write_eof", "write_eof")


class _TransportView:
    """The transport as the aiohttp protocol sees it: writes tell the guard a response went
    out; everything else is the real transport's."""

    __slots__ = ("_conn", "_transport", *_DELEGATED)

    def __init__(self, transport: asyncio.Transport, conn: GuardedProtocol) -> None:
        self._transport = transport
        self._conn = conn
        for name in _DELEGATED:
            method = getattr(transport, name, None)
            if method is not None:
                setattr(self, name, method)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # a response's first bytes are "HTTP/1.1 NNN": a 1xx (100 Continue) is not the answer
        if self._conn.phase != _IDLE and data[9:10] != b"1":
            self._conn.went_idle()
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        if not isinstance(chunks, list | tuple):
            chunks = list(chunks)
        if chunks and self._conn.phase != _IDLE and chunks[0][9:10] != b"1":
            self._conn.went_idle()
        self._transport.writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, its phase and since-when outside."""

    __slots__ = ("_admitted", "_guard", "_inner", "_lane", "_tail", "_time", "phase",
                 "received", "since", "transport")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._admitted = False
        self._tail = b""
        self._time = guard.loop.time
        self.phase = _HEAD
        self.since = self._time()
        self.received = 0  # bytes since the head ended (counted from the read that ended it)
        self.transport: asyncio.Transport | None = None
        # the lane serves the connection until it hands it to aiohttp's protocol (lane.py)
        self._lane: LaneConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        self.since = self._time()
        if not self._guard.admit(self):
            transport.abort()
            return
        self._admitted = True
        lane = self._guard.lane
        if lane is not None and not lane.closing:
            self._lane = lane.connection(transport, self.went_idle, self._hand_over)
        else:
            self._inner.connection_made(_TransportView(transport, self))  # type: ignore[arg-type]

    def _hand_over(self, data: bytes) -> None:
        """From now on aiohttp's protocol serves the connection, from `data` on."""
        self._lane = None
        assert self.transport is not None
        self._inner.connection_made(_TransportView(self.transport, self))  # type: ignore[arg-type]
        if data:
            self._inner.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.phase == _BODY:
            self.received += len(data)
        else:
            if not self._admitted:
                return
            # the blank line ending the head, also when split across reads (the tail keeps
            # the last 3 bytes seen, whatever the reads' sizes)
            if _HEAD_END in data or (self._tail and _HEAD_END in self._tail + data[:3]):
                self.phase, self.since, self.received = _BODY, self._time(), len(data)
            else:
                if self.phase == _IDLE:
                    self.phase, self.since = _HEAD, self._time()
                self._tail = (self._tail + data[-3:])[-3:]
        if self._lane is not None:
            self._lane.data_received(data)
        else:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._admitted and self._lane is None:
            return self._inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.forget(self)
        if self._lane is not None:
            self._lane.connection_lost()
            self._lane = None
            self._admitted = False
        elif self._admitted:
            self._admitted = False
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._lane is not None:
            self._lane.pause_writing()
        else:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._lane is not None:
            self._lane.resume_writing()
        else:
            self._inner.resume_writing()

    def went_idle(self) -> None:
        """A response went out: the connection is idle from now."""
        self.phase, self.since, self._tail = _IDLE, self._time(), b""

    def close_expired(self, why: str) -> None:
        log.debug("closing a connection: %s", why)
        if self.transport is not None:
            self.transport.abort()


class ConnectionGuard:
    """The connections of one serving process, their deadlines and their cap."""

    def __init__(self, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.loop = loop
        self._connections: dict[GuardedProtocol, None] = {}  # insertion-ordered set
        self._limits_s = (limits.header_timeout_s, limits.body_timeout_s + BODY_GRACE_S,
                          limits.keepalive_timeout_s)
        self._sweeper: asyncio.Task[None] | None = None
        self.lane: Lane | None = None  # set before serving to serve the decision routes
        self.evicted = 0
        self.refused = 0
        self.expired = 0

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """Wraps a protocol factory (aiohttp's `web.Server`) for `loop.create_server`."""
        def make() -> asyncio.Protocol:
            return GuardedProtocol(self, inner())
        return make

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def admit(self, conn: GuardedProtocol) -> bool:
        if len(self._connections) >= self.limits.max_connections:
            victim = self._victim()
            if victim is None:
                self.refused += 1
                log.debug("refusing a connection: all %d are busy", len(self._connections))
                return False
            self.evicted += 1
            self.forget(victim)
            victim.close_expired("evicted (max_connections reached)")
        self._connections[conn] = None
        return True

    def forget(self, conn: GuardedProtocol) -> None:
        self._connections.pop(conn, None)

    def _victim(self) -> GuardedProtocol | None:
        """The connection a new one displaces: the body furthest behind the minimum rate,
        else the one idle longest, else the oldest unfinished head; never a body on pace."""
        now = self.loop.time()
        rate = self.limits.min_body_bytes_per_s
        best: GuardedProtocol | None = None
        best_key = (0, 0.0)
        for conn in self._connections:
            waited = now - conn.since
            if conn.phase == _BODY:
                behind = rate * (waited - BODY_PACE_GRACE_S) - conn.received
                if behind <= 0:
                    continue
                key = (3, behind)
            else:
                key = (2 if conn.phase == _IDLE else 1, waited)
            if best is None or key > best_key:
                best, best_key = conn, key
        return best

    def sweep(self) -> None:
        """Closes every connection past its phase's deadline."""
        now = self.loop.time()
        expired = [c for c in self._connections if now - c.since > self._limits_s[c.phase]]
        for conn in expired:
            self.expired += 1
            self.forget(conn)
            conn.close_expired(f"{_PHASE_NAMES[conn.phase]} took longer than "
                               f"{self._limits_s[conn.phase]:g} s")

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(1.0, min(self._limits_s) / 4))
        while True:
            await asyncio.sleep(interval)
            self.sweep()


class GuardedSite(web.BaseSite):
    """A listening socket (TCP host:port, or a bound socket) served through the guard."""

    __slots__ = ("_address", "_guard", "_reuse_port", "_sock")

    def __init__(self, runner: web.BaseRunner, guard: ConnectionGuard, *,
                 address: tuple[str, int] | None = None, sock: socket.socket | None = None,
                 reuse_port: bool = False, backlog: int = 1024) -> None:
        super().__init__(runner, backlog=backlog)
        self._guard = guard
        self._address = address
        self._sock = sock
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        if self._address is not None:
            return f"http://{self._address[0]}:{self._address[1]}"
        return f"sock:{self._sock.getsockname() if self._sock else '?'}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        factory = self._guard.factory(server)
        loop = asyncio.get_running_loop()
        if self._address is not None:
            host, port = self._address
            self._server = await loop.create_server(
                factory, host, port, backlog=self._backlog, reuse_address=True,
                reuse_port=self._reuse_port)
        else:
            assert self._sock is not None
            self._server = await loop.create_server(factory, sock=self._sock,
                                                    backlog=self._backlog)
