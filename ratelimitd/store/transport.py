"""How the quota engine's calls reach Redis: the Transport protocol, and two of its three
implementations (the third, `ClusterTransport`, is cluster.py's).

The protocol holds what its callers use, no more: the script runner (quota/runner.py) makes
FCALLs (`fcall`; `fcall_acked` for the writes `[redis] replicas_ack` waits for) and keeps the
function library in Redis (`has_library`, `load_library`); the engine reads its reservation-id
secret with `execute`; the Store (connect.py) closes it. Calls made in the same event-loop tick
share one write to Redis. `PipeTransport` sends them through the pipelined connection of a
standalone Redis (or of Sentinel's primary of the moment), `ClusterTransport` through one per
cluster primary, `BatchTransport` through one redis-py pipeline per batch (TLS). Each raises
StoreUnavailable (an error reply: StoreReplyError) and nothing else, and bounds every call by
the configured timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from ratelimitd.store.failures import store_error
from ratelimitd.store.pipeline import PipelinedConnection
from ratelimitd.store.replication import ReplicaAck

# A batch is sent once this many calls wait, without waiting for the end of the tick: small
# batches let Redis run one while the daemon prepares the next, where one big batch per tick
# makes the two take turns (bench/ measured 8 against 256).
MAX_BATCH: Final = 8


class Transport(Protocol):
    def fcall(self, function: str, args: Sequence[Any]) -> Awaitable[Any]:
        """One FCALL of `args` (numkeys, keys..., arguments...): its reply."""
        ...

    async def fcall_acked(self, function: str, args: Sequence[Any]) -> tuple[Any, bool | None]:
        """fcall, for a write that `[redis] replicas_ack` waits for (replication.py): its reply,
        and whether the replicas acknowledged it (None: no acknowledgement is asked for)."""
        ...

    async def load_library(self, source: str) -> None:
        """FUNCTION LOAD REPLACE (on every primary of a cluster)."""
        ...

    async def has_library(self, name: str) -> bool:
        """Whether Redis answers and holds the library `name`."""
        ...

    async def execute(self, *args: Any) -> Any:
        """One plain command (of a single key, in a cluster)."""
        ...

    async def aclose(self) -> None: ...


@contextlib.asynccontextmanager
async def bounded(timeout_s: float | None) -> AsyncIterator[None]:
    """Bounds a block by the timeout; any failure inside is StoreUnavailable."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except Exception as exc:
        # RedisError, OSError (TimeoutError is one), and what redis-py leaks from a socket the
        # peer closed (AttributeError, TypeError: redis/redis-py#4287)
        raise store_error(exc) from exc


@dataclass(slots=True)
class PipeTransport:
    """Calls through the pipelined connection of a standalone Redis."""

    pipe: PipelinedConnection
    timeout_s: float | None
    acks: ReplicaAck | None = None        # [redis] replicas_ack > 0 (replication.py)
    # the acknowledged writes' own connection, to the same server as `pipe` (with `acks`)
    acked_pipe: PipelinedConnection | None = None

    def fcall(self, function: str, args: Sequence[Any]) -> Awaitable[Any]:
        return self.pipe.call("FCALL", function, *args)

    async def fcall_acked(self, function: str, args: Sequence[Any]) -> tuple[Any, bool | None]:
        if self.acks is None or self.acked_pipe is None:
            return await self.pipe.call("FCALL", function, *args), None
        return await self.acks.call(self.acked_pipe, ("FCALL", function, *args))

    async def load_library(self, source: str) -> None:
        async with bounded(self.timeout_s):
            await self.pipe.call("FUNCTION", "LOAD", "REPLACE", source)

    async def has_library(self, name: str) -> bool:
        async with bounded(self.timeout_s):
            return bool(await self.pipe.call("FUNCTION", "LIST", "LIBRARYNAME", name))

    async def execute(self, *args: Any) -> Any:
        async with bounded(self.timeout_s):
            return await self.pipe.call(*args)

    async def aclose(self) -> None:
        await self.pipe.aclose()
        if self.acked_pipe is not None:
            await self.acked_pipe.aclose()


@dataclass(slots=True)
class _Call:
    function: str
    args: Sequence[Any]                   # numkeys, keys..., args...
    done: asyncio.Future[Any]


@dataclass(slots=True)
class BatchTransport:
    """Calls through redis-py: those of each event-loop tick go out as one pipeline. The
    timeout bounds each batch as a whole (one timer per batch, not one per reply); past it
    every call of the batch fails."""

    client: Redis | RedisCluster
    timeout_s: float | None
    _pending: list[_Call] = field(default_factory=list)
    _flush: asyncio.Handle | None = None

    def fcall(self, function: str, args: Sequence[Any]) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        call = _Call(function, args, loop.create_future())
        self._pending.append(call)
        if len(self._pending) >= MAX_BATCH:
            self._send()
        elif self._flush is None:
            self._flush = loop.call_soon(self._send)
        return call.done

    async def fcall_acked(self, function: str, args: Sequence[Any]) -> tuple[Any, bool | None]:
        # replicas_ack is refused with TLS, the only mode this transport serves
        return await self.fcall(function, args), None

    async def load_library(self, source: str) -> None:
        async with bounded(self.timeout_s):
            await self.client.function_load(source, replace=True)

    async def has_library(self, name: str) -> bool:
        async with bounded(self.timeout_s):
            return bool(await self.client.function_list(library=name))

    async def execute(self, *args: Any) -> Any:
        async with bounded(self.timeout_s):
            return await self.client.execute_command(*args)

    async def aclose(self) -> None:
        """The client is the Store's, closed there."""

    def _send(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch, self._pending = self._pending, []
        if batch:
            asyncio.get_running_loop().create_task(self._execute(batch))

    async def _execute(self, batch: list[_Call]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                if len(batch) == 1:
                    replies: list[Any] = [await self._one(batch[0])]
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for call in batch:
                        pipe.execute_command("FCALL", call.function, *call.args)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            # redis-py leaks more than RedisError from a closed socket (AttributeError,
            # TypeError: redis/redis-py#4287): every call must fail, none may wait forever
            failure = store_error(exc)
            for call in batch:
                if not call.done.done():
                    call.done.set_exception(failure)
            return
        for call, reply in zip(batch, replies, strict=True):
            if call.done.done():
                continue
            if isinstance(reply, Exception):
                call.done.set_exception(store_error(reply))
            else:
                call.done.set_result(reply)

    async def _one(self, call: _Call) -> Any:
        try:
            return await self.client.execute_command("FCALL", call.function, *call.args)
        except ResponseError as exc:
            return exc
