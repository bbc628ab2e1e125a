"""The Lua scripts of lua/, and the runner that sends them to Redis.

Scripts run by SHA (EVALSHA) and are loaded again when Redis answers NOSCRIPT. Calls made in
the same event-loop tick (concurrent decisions) share one pipeline: one write, one read and one
pooled connection for the whole batch instead of one each, which is most of a call's cost in
the client. Each call still is its own atomic script.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

LUA_DIR: Final = Path(__file__).resolve().parent.parent / "lua"
ENTRY_SCRIPTS: Final = ("reserve", "settle")
# A batch is sent once this many calls wait, without waiting for the end of the tick: small
# batches let Redis run one while the daemon prepares the next, where one big batch per tick
# makes the two take turns (measured: 8 gave ~13% more throughput than 256 in bench/).
MAX_BATCH: Final = 8

RedisClient = Redis | RedisCluster


def script_source(name: str) -> str:
    """An entry script with the shared helpers of common.lua in front of it."""
    return (LUA_DIR / "common.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def named(cls, name: str) -> Script:
        source = script_source(name)
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324


@dataclass(slots=True)
class _Call:
    script: Script
    args: list[Any]                       # numkeys, keys..., args...
    done: asyncio.Future[Any]


@dataclass(slots=True)
class ScriptRunner:
    """Runs scripts for one client, batching the calls of each event-loop tick.

    timeout_s bounds each batch as a whole (one timer per batch, not one per reply read);
    past it every call of the batch fails with a Redis TimeoutError."""

    client: RedisClient
    timeout_s: float | None = None
    reserve: Script = field(default_factory=lambda: Script.named("reserve"))
    settle: Script = field(default_factory=lambda: Script.named("settle"))
    _pending: list[_Call] = field(default_factory=list)
    _flush: asyncio.Handle | None = None

    async def load(self) -> None:
        """Loads every script now, so the first decisions do not pay for it."""
        async with self.bounded():
            for script in (self.reserve, self.settle):
                await self.client.script_load(script.source)

    async def ready(self) -> None:
        """Raises a RedisError unless Redis answers and holds both scripts (loading them)."""
        async with self.bounded():
            await self.client.ping()
            found = await self.client.script_exists(self.reserve.sha, self.settle.sha)
        if not all(found):
            await self.load()

    @contextlib.asynccontextmanager
    async def bounded(self) -> AsyncIterator[None]:
        """The runner's timeout around other calls, failing as a Redis TimeoutError."""
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except TimeoutError as exc:
            raise RedisTimeoutError("Redis did not answer in time") from exc

    def run(self, script: Script, args: list[Any]) -> asyncio.Future[Any]:
        """Queues one EVALSHA of `args` (numkeys, keys..., arguments...); the future resolves
        to its reply."""
        loop = asyncio.get_running_loop()
        call = _Call(script, args, loop.create_future())
        self._pending.append(call)
        if len(self._pending) >= MAX_BATCH:
            self._send()
        elif self._flush is None:
            self._flush = loop.call_soon(self._send)
        return call.done

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
                        pipe.execute_command("EVALSHA", call.script.sha, *call.args)
                    replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            # a socket error or our timer is the store being unreachable, like any other
            failure = exc if isinstance(exc, RedisError) else (
                RedisTimeoutError("Redis did not answer in time") if isinstance(exc, TimeoutError)
                else RedisConnectionError(str(exc)))
            for call in batch:
                if not call.done.done():
                    call.done.set_exception(failure)
            return
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                reply = await self._reloaded(call)
            if call.done.done():
                continue
            if isinstance(reply, Exception):
                call.done.set_exception(reply)
            else:
                call.done.set_result(reply)

    async def _one(self, call: _Call) -> Any:
        try:
            return await self.client.execute_command("EVALSHA", call.script.sha, *call.args)
        except NoScriptError as exc:
            return exc

    async def _reloaded(self, call: _Call) -> Any:
        """Redis lost its scripts (restart, failover, SCRIPT FLUSH): load and run again."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.script_load(call.script.source)
                return await self.client.execute_command("EVALSHA", call.script.sha,
                                                         *call.args)
        except (ResponseError, RedisError) as exc:
            return exc
        except OSError as exc:
            return RedisConnectionError(str(exc))
