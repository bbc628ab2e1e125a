"""Runs the library's functions over a transport, loading the library when Redis lacks it.

A Redis that lost the library (restart without persistence, failover to a node without it,
FUNCTION FLUSH) answers "Function not found": the runner loads it and calls once more, the
way redis-py's Script reloads an EVALSHA script. Error replies from the Lua are reported with
the source file and line (Library.explain).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ratelimitd.errors import StoreReplyError
from ratelimitd.quota.library import Library, Script
from ratelimitd.store.transport import Transport


@functools.cache
def shipped_library() -> Library:
    """The library built from the shipped Lua, once per process."""
    return Library.build()


@dataclass(slots=True)
class ScriptRunner:
    transport: Transport
    library: Library = field(default_factory=shipped_library)

    async def load(self) -> None:
        """Loads the library now, so the first decisions do not pay for it."""
        await self.transport.load_library(self.library.source)

    async def ready(self) -> None:
        """Raises StoreUnavailable unless Redis answers and holds the library (loading it)."""
        if not await self.transport.has_library(self.library.name):
            await self.load()

    def send_reserve(self, args: Sequence[Any]) -> Awaitable[Any]:
        """A reserve FCALL sent now, in this event-loop tick's write, its reply awaited later.
        A lost library fails it with StoreReplyError (`missing_function`): `reserve` then
        loads it and asks again."""
        return self.transport.fcall(self.library.reserve.function, args)

    # The three below return _run's coroutine rather than await it in one of their own: one
    # coroutine less on every decision.
    def reserve(self, args: Sequence[Any]) -> Awaitable[Any]:
        """The library's reserve: its reply."""
        return self._run(self.library.reserve, args)

    def settle(self, args: Sequence[Any]) -> Awaitable[Any]:
        """The library's settle: its reply."""
        return self._run(self.library.settle, args)

    def settle_acked(self, args: Sequence[Any]) -> Awaitable[tuple[Any, bool | None]]:
        """settle, for a write `[redis] replicas_ack` waits for: its reply, and whether the
        replicas acknowledged it (None: none asked for)."""
        return self._run_acked(self.library.settle, args)

    async def _run(self, script: Script, args: Sequence[Any]) -> Any:
        """One FCALL of `args` (numkeys, keys..., arguments...): its reply."""
        try:
            return await self.transport.fcall(script.function, args)
        except StoreReplyError as exc:
            if not exc.missing_function:
                raise StoreReplyError(self.library.explain(str(exc))) from exc
        await self.load()
        return await self.transport.fcall(script.function, args)

    async def _run_acked(self, script: Script, args: Sequence[Any]) -> tuple[Any, bool | None]:
        try:
            return await self.transport.fcall_acked(script.function, args)
        except StoreReplyError as exc:
            if not exc.missing_function:
                raise StoreReplyError(self.library.explain(str(exc))) from exc
        await self.load()
        return await self.transport.fcall_acked(script.function, args)
