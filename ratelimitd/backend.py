"""Connections to Redis: standalone, cluster or sentinel, with bounded pools and timeouts.

redis-py serves every mode; on a standalone Redis the daemon's hot path also gets a
PipelinedConnection of its own (see there).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable
from typing import Any, Final
from urllib.parse import urlsplit

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from ratelimitd.config import RedisConfig
from ratelimitd.scripts import RedisClient

# Concurrent Redis calls one daemon process may have; past it a call fails (503) at once instead
# of opening sockets, or queueing, without bound.
MAX_CONNECTIONS: Final = 64
MAX_IN_FLIGHT: Final = 4096


class _HiredisPacking(AbstractConnection):
    """redis-py packs commands with hiredis (C) on sync connections but in Python on asyncio
    ones, where that is most of a call's client CPU; this packs them with hiredis too. The
    bytes on the wire are the same."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD": two words on the wire
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]  # type: ignore[arg-type]  # stub: 1-tuple


class HiredisConnection(_HiredisPacking, Connection):
    pass


class HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


_HIREDIS_CLASSES: Final[dict[type[AbstractConnection], type[AbstractConnection]]] = {
    Connection: HiredisConnection, UnixDomainSocketConnection: HiredisUnixConnection,
    SSLConnection: HiredisSSLConnection,
}


def connect(config: RedisConfig, url: str) -> RedisClient:
    """A client for `url` (the configured one, or the embedded server's unix socket)."""
    timeout = config.timeout_ms / 1000
    if config.mode == "cluster":
        return RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                     max_connections=MAX_CONNECTIONS)
    if config.mode == "sentinel":
        return _sentinel_master(url, timeout)
    # No per-read socket timeout: the script runner bounds each batch as a whole, which costs
    # one timer per batch instead of one per reply (see scripts.ScriptRunner).
    pool = ConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS,
                                   socket_connect_timeout=timeout)
    # from_url picks the class from the url's scheme; swap in its hiredis-packing twin
    pool.connection_class = _HIREDIS_CLASSES.get(pool.connection_class, pool.connection_class)
    return Redis(connection_pool=pool)


def _sentinel_master(url: str, timeout: float) -> Redis:
    """redis+sentinel://host:port[,host:port]/service_name -> the service's current master."""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host.strip("[]"), int(port or 26379)))
    service = parts.path.strip("/")
    sentinel = Sentinel(hosts, socket_timeout=timeout,  # type: ignore[no-untyped-call]
                        socket_connect_timeout=timeout, password=parts.password)
    master: Redis = sentinel.master_for(service, socket_timeout=timeout,
                                        password=parts.password)
    return master


class _PipelineProtocol(asyncio.Protocol):
    """The socket side of PipelinedConnection: queues commands, writes them once per event-loop
    tick, and resolves each waiting future with its reply, in order."""

    def __init__(self, timeout_s: float | None, max_in_flight: int) -> None:
        # the loop, kept: asyncio.get_running_loop() makes a getpid() system call each time
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, args: tuple[EncodableT, ...]) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        if self.closed or len(self._waiting) >= self._max_in_flight:
            future.set_exception(RedisConnectionError(
                "the connection to Redis is closed" if self.closed
                else f"{self._max_in_flight} calls already wait for Redis"))
            return future
        self._waiting.append(future)
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
            # one timer per write: when its last reply is late, so is the connection
            self._loop.call_later(self._timeout_s, self._check, self._waiting[-1])

    def _check(self, last: asyncio.Future[Any], second_look: bool = False) -> None:
        if last.done():
            return
        if not second_look:
            # A loop that was busy runs due timers before it reads sockets (uvloop does), so
            # a reply may be waiting unread: look again once the loop has read them.
            self._loop.call_later(0.001, self._check, last, True)
            return
        self.fail(RedisTimeoutError("Redis did not answer in time"))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future = self._waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"lost the connection to Redis: {exc or 'closed'}"))

    def fail(self, error: RedisError) -> None:
        """Every waiting call fails, and the connection is done for."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


class PipelinedConnection:
    """One connection to a standalone Redis that pipelines every call.

    Calls made in the same event-loop tick leave in one write, and Redis answers in order, so
    each reply resolves the oldest waiting call. This is the daemon's hot path: measured with
    bench/, it costs half the client CPU per call of redis-py's asyncio pipeline (19 vs 38 us),
    which does much more per batch (command stacks, retries, a pooled connection each).
    redis-py still does everything else (loading the library, health checks, cluster and
    sentinel). timeout_s bounds each write's replies; past it, or when the connection drops,
    every waiting call fails with a RedisError and the next call connects again. At most
    max_in_flight calls wait at once; one more fails at once.
    """

    def __init__(self, url: str, timeout_s: float | None,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._params = parse_url(url)
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._protocol: _PipelineProtocol | None = None
        self._lock = asyncio.Lock()

    def call(self, *args: EncodableT) -> Awaitable[Any]:
        """One command's reply; an error reply raises its ResponseError. (A future when
        connected: no coroutine per call.)"""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return self._connect_and_call(args)
        return protocol.send(args)

    async def _connect_and_call(self, args: tuple[EncodableT, ...]) -> Any:
        protocol = await self._connect()
        return await protocol.send(args)

    async def _connect(self) -> _PipelineProtocol:
        async with self._lock:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            params, loop = self._params, asyncio.get_running_loop()
            factory = functools.partial(_PipelineProtocol, self._timeout_s, self._max_in_flight)
            protocol: _PipelineProtocol | None = None
            try:
                async with asyncio.timeout(self._timeout_s):
                    if "path" in params:
                        _, protocol = await loop.create_unix_connection(factory, params["path"])
                    else:
                        _, protocol = await loop.create_connection(
                            factory, params.get("host", "localhost"), params.get("port", 6379))
                    await self._handshake(protocol)
            except BaseException as exc:
                if protocol is not None:
                    protocol.fail(RedisConnectionError("the connection to Redis was closed"))
                if isinstance(exc, TimeoutError):
                    raise RedisTimeoutError("Redis did not answer in time") from exc
                if isinstance(exc, OSError):
                    raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
                raise
            self._protocol = protocol
            return protocol

    async def _handshake(self, protocol: _PipelineProtocol) -> None:
        params = self._params
        if params.get("password"):
            user = (params["username"],) if params.get("username") else ()
            await protocol.send(("AUTH", *user, params["password"]))
        if params.get("db"):
            await protocol.send(("SELECT", params["db"]))

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("the connection to Redis was closed"))


def pipelined(config: RedisConfig, url: str) -> PipelinedConnection | None:
    """The hot-path connection for a standalone Redis over TCP or a unix socket; None where
    redis-py does the whole job (cluster, sentinel, TLS)."""
    if config.mode != "standalone" or not url.startswith(("redis://", "unix://")):
        return None
    return PipelinedConnection(url, config.timeout_ms / 1000)
