"""The hot path's connection to a standalone Redis: one socket that pipelines every call.

Calls made in the same event-loop tick leave in one write, and Redis answers in order, so each
reply resolves the oldest waiting call. It costs half the client CPU per call of redis-py's
asyncio pipeline (docs/performance.md), which does much more per batch (command stacks,
retries, a pooled connection each). Failures are StoreUnavailable (an error reply:
StoreReplyError), never a driver's exception.

Once Redis fails to answer in time (a stalled server, a partition: a reply or a connection
that did not come within the timeout), calls fail at once until a new connection has answered
PING, which a background task tries again and again (RECONNECT_PAUSE_S after each failed try):
a request never waits out one timeout after another (each call is bounded by timeout_ms,
however many calls a request makes), and service resumes by itself as soon as Redis answers.
A refused or dropped connection (Redis down or restarting, READONLY after a failover) costs
no wait, so there the next call simply connects again.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import hiredis
from redis.asyncio.connection import parse_url
from redis.typing import EncodableT

from ratelimitd.errors import StoreReplyError, StoreUnavailable

# Calls one connection lets wait for Redis; one more fails at once instead of queueing
# without bound.
MAX_IN_FLIGHT: Final = 4096
# A busy loop runs due timers before it reads sockets (uvloop does): before calling a reply
# late, look again this much later, once the loop has read them.
SECOND_LOOK_S: Final = 0.001
# Between two failed attempts to reconnect in the background.
RECONNECT_PAUSE_S: Final = 0.05


def _timed_out() -> StoreUnavailable:
    return StoreUnavailable("Redis did not answer in time", timeout=True)


class _PipelineProtocol(asyncio.Protocol):
    """The socket side of PipelinedConnection: queues commands, writes them once per event-loop
    tick, and resolves each waiting future with its reply, in order."""

    def __init__(self, timeout_s: float | None, max_in_flight: int,
                 on_lost: Callable[[StoreUnavailable], None]) -> None:
        # the loop, kept: asyncio.get_running_loop() makes a getpid() system call each time
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._reader = hiredis.Reader(protocolError=StoreUnavailable,
                                     replyError=StoreReplyError)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        self._sent = 0          # commands sent, and replies received, on this connection
        self._received = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, args: tuple[EncodableT, ...]) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        if self.closed or len(self._waiting) >= self._max_in_flight:
            future.set_exception(StoreUnavailable(
                "the connection to Redis is closed" if self.closed
                else f"{self._max_in_flight} calls already wait for Redis"))
            return future
        self._waiting.append(future)
        self._sent += 1
        if not self._out:
            self._loop.call_soon(self._write)
        self._out.append(hiredis.pack_command(args))  # type: ignore[arg-type]
        return future

    def _write(self) -> None:
        if self.closed or self._transport is None:
            return
        self._transport.write(b"".join(self._out))
        self._out.clear()
        if self._timeout_s is not None:
            # one timer per write: when its last reply is late, so is the connection. Counted
            # in replies, not futures: a caller that gave up (cancelled its future) leaves
            # the reply still owed, and a Redis that owes it is late all the same.
            self._loop.call_later(self._timeout_s, self._check, self._sent)

    def _check(self, last: int, second_look: bool = False) -> None:
        if self._received >= last or self.closed:
            return
        if not second_look:
            # A loop that was busy runs due timers before it reads sockets (uvloop does), so
            # a reply may be waiting unread: look again once the loop has read them.
            self._loop.call_later(SECOND_LOOK_S, self._check, last, True)
            return
        self.fail(_timed_out())

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(StoreUnavailable("Redis sent a reply nobody asked for"))
                return
            future = self._waiting.popleft()
            self._received += 1
            if isinstance(reply, StoreReplyError) and str(reply).startswith("READONLY"):
                # the server became a replica (a failover): this connection is done for, and
                # the next call connects anew, to the primary of the moment where it is located
                self._waiting.appendleft(future)
                self.fail(reply)
                return
            if future.done():
                continue
            if isinstance(reply, StoreReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(StoreUnavailable(f"lost the connection to Redis: {exc or 'closed'}"))

    def fail(self, error: StoreUnavailable) -> None:
        """Every waiting call fails, and the connection is done for."""
        if not self.closed:
            self._on_lost(error)
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


class PipelinedConnection:
    """One connection to a standalone Redis that pipelines every call.

    timeout_s bounds each write's replies; past it, or when the connection drops, every
    waiting call fails with StoreUnavailable and the next call connects again. At most
    max_in_flight calls wait at once; one more fails at once. `locate`, when given, names the
    (host, port) to connect to at each connection (Sentinel's primary of the moment); the url
    then gives only the credentials and db.
    """

    def __init__(self, url: str, timeout_s: float | None,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 locate: Callable[[], Awaitable[tuple[str, int]]] | None = None) -> None:
        self._params = parse_url(url)
        self._locate = locate
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._protocol: _PipelineProtocol | None = None
        self._lock = asyncio.Lock()
        # after a failure: the task reconnecting in the background, and why it must
        self._probe: asyncio.Task[None] | None = None
        self._down: StoreUnavailable | None = None
        self._closed = False

    def call(self, *args: EncodableT) -> Awaitable[Any]:
        """One command's reply; an error reply raises StoreReplyError. (A future when
        connected: no coroutine per call.) While a lost connection is being restored, calls
        fail at once (module docstring)."""
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol.send(args)
        if self._down is not None:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(StoreUnavailable(
                f"Redis is unavailable ({self._down}); reconnecting in the background",
                timeout=self._down.timeout))
            return future
        return self._connect_and_call(args)

    async def _connect_and_call(self, args: tuple[EncodableT, ...]) -> Any:
        protocol = await self._connect()
        return await protocol.send(args)

    async def _connect(self) -> _PipelineProtocol:
        async with self._lock:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            try:
                self._protocol = protocol = await self._open()
            except StoreUnavailable as exc:
                self._lost(exc)
                raise
            return protocol

    async def _open(self) -> _PipelineProtocol:
        params, loop = self._params, asyncio.get_running_loop()
        factory = functools.partial(_PipelineProtocol, self._timeout_s, self._max_in_flight,
                                    self._lost)
        protocol: _PipelineProtocol | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._locate is not None:
                    host, port = await self._locate()
                    params = {**params, "host": host, "port": port}
                if "path" in params:
                    _, protocol = await loop.create_unix_connection(factory, params["path"])
                else:
                    _, protocol = await loop.create_connection(
                        factory, params.get("host", "localhost"), params.get("port", 6379))
                await self._handshake(protocol)
        except BaseException as exc:
            if protocol is not None:
                protocol.fail(StoreUnavailable("the connection to Redis was closed"))
            if isinstance(exc, TimeoutError):
                raise _timed_out() from exc
            if isinstance(exc, OSError):
                raise StoreUnavailable(f"cannot connect to Redis: {exc}") from exc
            raise
        return protocol

    def _lost(self, error: StoreUnavailable) -> None:
        """A connection failed. After a timeout, reconnect in the background and fail calls
        at once meanwhile; after a refused or dropped connection, the next call connects
        again itself (which fails at once while Redis is down)."""
        if (not error.timeout or self._closed
                or (self._probe is not None and not self._probe.done())):
            return
        self._down = error
        self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Opens connections until one answers PING within the timeout; then calls use it.
        A connection refused or dropped (not slow) hands connecting back to the calls."""
        while not self._closed:
            protocol: _PipelineProtocol | None = None
            try:
                protocol = await self._open()
                async with asyncio.timeout(self._timeout_s):
                    await protocol.send(("PING",))
            except (StoreUnavailable, TimeoutError) as exc:
                failure = exc if isinstance(exc, StoreUnavailable) else _timed_out()
                if protocol is not None:
                    protocol.fail(failure)
                if not failure.timeout:
                    self._down = None
                    return
                self._down = failure
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            self._protocol, self._down = protocol, None
            return

    async def _handshake(self, protocol: _PipelineProtocol) -> None:
        params = self._params
        if params.get("password"):
            user = (params["username"],) if params.get("username") else ()
            await protocol.send(("AUTH", *user, params["password"]))
        if params.get("db"):
            await protocol.send(("SELECT", params["db"]))

    async def aclose(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
        if self._protocol is not None:
            self._protocol.fail(StoreUnavailable("the connection to Redis was closed"))
