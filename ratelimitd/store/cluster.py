"""The hot path on a Redis Cluster: one pipelined connection per primary, calls routed by slot.

Every FCALL's keys share one hash slot (`{…}` hash tags), so each call goes whole to the
primary that serves its first key's slot, through that primary's PipelinedConnection: the
cluster costs the daemon what a standalone Redis does, per call. The slot map comes from
`CLUSTER SLOTS`, asked of any node known (the configured one first):

- a `MOVED slot host:port` reply points that slot at its new owner, the call is sent there
  again, and the whole map is refreshed in the background (a resharding moves many slots);
- an `ASK` reply sends the call once to the node named, behind `ASKING` (a slot mid-migration);
- `TRYAGAIN` (a multi-key call mid-migration) and `CLUSTERDOWN` (a failover under way) are
  retried after a short pause, all within the call's timeout;
- a lost or silent node refreshes the map (its replica may have taken over) and fails the call:
  the FCALL may have run, and the quota engine, not the transport, knows how to retry it.

The map is also refreshed every REFRESH_S, so a primary added to the cluster is found; the
library is loaded on every primary of each new map that lacks it (`load_library` remembers it),
and a primary that still lacks it answers "Function not found", which the runner handles.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Final
from urllib.parse import quote, urlsplit

from redis.crc import key_slot
from redis.typing import EncodableT

from ratelimitd.errors import StoreReplyError, StoreUnavailable
from ratelimitd.store.pipeline import PipelinedConnection
from ratelimitd.store.replication import ReplicaAck

log = logging.getLogger("ratelimitd.store")

SLOTS: Final = 16384
# Redirections one call follows before it gives up (a slot moves once per resharding step).
MAX_REDIRECTS: Final = 5
# The slot map is asked for again this often, to find primaries added to the cluster.
REFRESH_S: Final = 10.0
# The pause before retrying TRYAGAIN / CLUSTERDOWN.
RETRY_PAUSE_S: Final = 0.01

Address = tuple[str, int]


def _slot_of(args: Sequence[Any]) -> int:
    """The slot of a call's first key (FCALL args: numkeys, keys...; plain: CMD, key, ...)."""
    key = args[1] if len(args) > 1 else b""
    return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))


def _redirect(error: StoreReplyError) -> tuple[str, int, Address] | None:
    """("MOVED" | "ASK", slot, address) of a redirection reply, else None."""
    kind, _, rest = str(error).partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, where = rest.strip().partition(" ")
    host, _, port = where.rpartition(":")
    return kind, int(slot), (host.strip("[]"), int(port))


class ClusterTransport:
    """Calls to a Redis Cluster, pipelined per primary (module docstring)."""

    def __init__(self, url: str, timeout_s: float | None, acks: ReplicaAck | None = None) -> None:
        parts = urlsplit(url)
        self._auth = ""
        if parts.password:
            user = quote(parts.username or "", safe="")
            self._auth = f"{user}:{quote(parts.password, safe='')}@"
        self._seeds: list[Address] = [(parts.hostname or "127.0.0.1", parts.port or 6379)]
        self.timeout_s = timeout_s
        self._acks = acks
        self._slots: list[Address | None] = [None] * SLOTS
        self._primaries: set[Address] = set()
        self._pipes: dict[Address, PipelinedConnection] = {}
        # the acknowledged writes' own connections (replication.py), per primary
        self._acked_pipes: dict[Address, PipelinedConnection] = {}
        self._library: str | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._next_refresh = 0.0

    # -- the Transport protocol

    def fcall(self, function: str, args: Sequence[Any]) -> Awaitable[Any]:
        return self._call(("FCALL", function, *args), _slot_of(args))

    async def fcall_acked(self, function: str, args: Sequence[Any]) -> tuple[Any, bool | None]:
        if self._acks is None:
            return await self._call(("FCALL", function, *args), _slot_of(args)), None
        reply: tuple[Any, bool] = await self._call(("FCALL", function, *args), _slot_of(args),
                                                   acked=True)
        return reply

    async def execute(self, *args: Any) -> Any:
        return await self._bounded(self._call(args, _slot_of(args)))

    async def load_library(self, source: str) -> None:
        self._library = source
        await self._bounded(self._load_on(self._primaries or await self._refresh_now(), source))

    async def has_library(self, name: str) -> bool:
        async def check() -> bool:
            primaries = await self._refresh_now()
            replies = await asyncio.gather(*(
                self._pipe(a).call("FUNCTION", "LIST", "LIBRARYNAME", name) for a in primaries))
            return all(bool(r) for r in replies)
        return bool(await self._bounded(check()))

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for pipe in (*self._pipes.values(), *self._acked_pipes.values()):
            await pipe.aclose()
        self._pipes.clear()
        self._acked_pipes.clear()

    # -- routing

    def _pipe(self, address: Address, acked: bool = False) -> PipelinedConnection:
        pipes = self._acked_pipes if acked else self._pipes
        pipe = pipes.get(address)
        if pipe is None:
            pipe = PipelinedConnection(f"redis://{self._auth}{address[0]}:{address[1]}",
                                       self.timeout_s)
            pipes[address] = pipe
        return pipe

    async def _call(self, command: tuple[EncodableT, ...], slot: int, acked: bool = False
                    ) -> Any:
        """The command's reply; with `acked`, (reply, whether the replicas acknowledged it)."""
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_refresh:
            self._refresh_soon()
        address = self._slots[slot]
        if address is None:
            await self._bounded(self._refresh_now())
            address = self._slots[slot]
            if address is None:
                raise StoreUnavailable(f"no node of the cluster serves slot {slot}")
        asking = False
        for _ in range(MAX_REDIRECTS):
            pipe = self._pipe(address, acked)
            try:
                if asking:  # ASK is rare (a slot mid-migration): a round trip of its own
                    await pipe.call("ASKING")
                if acked and self._acks is not None:
                    return await self._acks.call(pipe, command)
                return await pipe.call(*command)
            except StoreReplyError as exc:
                redirect = _redirect(exc)
                if redirect is None:
                    if str(exc).startswith(("TRYAGAIN", "CLUSTERDOWN")):
                        await asyncio.sleep(RETRY_PAUSE_S)
                        asking = False
                        continue
                    raise
                kind, moved_slot, address = redirect
                asking = kind == "ASK"
                if not asking:
                    self._slots[moved_slot] = address
                    self._refresh_soon()
            except StoreUnavailable:
                self._refresh_soon()  # the node may be gone: its replica may serve its slots
                raise
        raise StoreUnavailable(f"slot {slot}: redirected {MAX_REDIRECTS} times")

    async def _bounded(self, work: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await work
        except TimeoutError as exc:
            raise StoreUnavailable("Redis did not answer in time", timeout=True) from exc

    # -- the slot map

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._next_refresh = asyncio.get_running_loop().time() + REFRESH_S
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self._bounded(self._refresh_now())
        except StoreUnavailable as exc:
            log.warning("could not refresh the cluster's slot map: %s", exc)
            self._next_refresh = 0.0  # try again on the next call

    async def _refresh_now(self) -> set[Address]:
        """Reads the slot map from the first node that answers; returns the primaries."""
        known = [*self._seeds, *sorted(self._primaries),
                 *sorted(set(self._pipes) - self._primaries)]
        failures = []
        for address in dict.fromkeys(known):
            try:
                reply = await self._pipe(address).call("CLUSTER", "SLOTS")
            except StoreUnavailable as exc:
                failures.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            self._apply(address, reply)
            self._next_refresh = asyncio.get_running_loop().time() + REFRESH_S
            return set(self._primaries)
        raise StoreUnavailable("no node of the cluster answered: " + "; ".join(failures))

    def _apply(self, asked: Address, reply: Sequence[Any]) -> None:
        slots: list[Address | None] = [None] * SLOTS
        primaries = set()
        for start, end, owner, *_ in reply:
            host = owner[0].decode() if isinstance(owner[0], bytes) else str(owner[0])
            address = (host or asked[0], int(owner[1]))  # "" means: the node you asked
            primaries.add(address)
            slots[int(start):int(end) + 1] = [address] * (int(end) - int(start) + 1)
        new = primaries - self._primaries
        gone = {*self._pipes, *self._acked_pipes} - primaries - set(self._seeds)
        self._slots, self._primaries = slots, primaries
        for address in gone:  # a demoted or removed primary: its connections are not needed
            for pipe in (self._pipes.pop(address, None), self._acked_pipes.pop(address, None)):
                if pipe is not None:
                    asyncio.get_running_loop().create_task(pipe.aclose())
        if new and self._library is not None:
            asyncio.get_running_loop().create_task(self._load_quietly(new, self._library))

    async def _load_on(self, primaries: set[Address], source: str) -> None:
        await asyncio.gather(*(self._pipe(a).call("FUNCTION", "LOAD", "REPLACE", source)
                               for a in primaries))

    async def _load_quietly(self, primaries: set[Address], source: str) -> None:
        try:
            await self._bounded(self._load_on(primaries, source))
        except StoreUnavailable as exc:  # the runner loads it on "Function not found"
            log.warning("could not load the library on a new primary: %s", exc)
