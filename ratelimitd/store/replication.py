"""Durability on demand: `[redis] replicas_ack = N` makes commits and releases wait for N replicas.

Redis replicates asynchronously, so a failover may lose a primary's last writes. With N > 0, a
commit's or a release's settle (the calls that record what was really spent) is followed, on
the same connection, by `WAIT N ms`: Redis answers it once N replicas have acknowledged every
write that connection made before it. WAIT never rolls a write back, so fewer
acknowledgements are not an error: the settle happened, and the caller is told it is not yet
replicated (`replicated` False), never asked to retry what no retry can change.

What keeps a lost replica from stalling everything else:
- the waited-for settles have a connection of their own per primary (the transports keep it):
  WAIT blocks the connection that sends it, and reserves, cancels and resizes never queue
  behind it;
- at most one WAIT per connection is under way: settles written meanwhile share the next one
  (it covers every earlier write of the connection), so waits never pile up past a timeout;
- once a WAIT falls short, settles on that connection do not wait for LAG_PROBE_S (they answer
  not replicated at once), after which the next one waits again, as a probe.
Reserves, cancels and resizes are not waited for: losing one under-charges at most one
reservation's estimate (or over-charges, for a cancel), which the next commit or expiry puts
right.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Final

from redis.typing import EncodableT

from ratelimitd.store.pipeline import PipelinedConnection

# After a WAIT fell short, settles on that connection skip waiting for this long.
LAG_PROBE_S: Final = 1.0


@dataclass(slots=True)
class _Waits:
    """One connection's WAITs: the one under way, the settles the next one will cover, and
    until when replication is known to lag (monotonic seconds)."""

    under_way: asyncio.Future[bool] | None = None
    next: asyncio.Future[bool] | None = None
    lagging_until: float = 0.0


@dataclass(slots=True)
class ReplicaAck:
    """Wait for `replicas` acknowledgements, at most `wait_ms`, after each commit and release."""

    replicas: int
    wait_ms: int
    _waits: weakref.WeakKeyDictionary[PipelinedConnection, _Waits] = field(
        default_factory=weakref.WeakKeyDictionary)

    @staticmethod
    def for_timeout(replicas: int, timeout_ms: int) -> ReplicaAck | None:
        """None when no acknowledgement is asked for. The wait takes at most three quarters
        of the call's timeout, so that WAIT's own answer (it answers with the count reached
        when its time is up) arrives before the connection's timer gives up on it."""
        if replicas <= 0:
            return None
        return ReplicaAck(replicas, max(1, timeout_ms * 3 // 4))

    async def call(self, pipe: PipelinedConnection, command: tuple[EncodableT, ...]
                   ) -> tuple[Any, bool]:
        """`command` on `pipe` (the acknowledged settles' own connection): its reply, and
        whether `replicas` replicas acknowledged it."""
        waits = self._waits.get(pipe)
        if waits is None:
            waits = self._waits[pipe] = _Waits()
        if time.monotonic() < waits.lagging_until:
            return await pipe.call(*command), False
        sent = asyncio.ensure_future(pipe.call(*command))
        acked = self._covering_wait(pipe, waits)
        reply = await sent
        # shielded: other settles share the same WAIT, a caller that gives up must not cancel it
        return reply, await asyncio.shield(acked)

    def _covering_wait(self, pipe: PipelinedConnection, waits: _Waits) -> asyncio.Future[bool]:
        """The WAIT that covers a write just made: a new one, or the one after the WAIT under
        way (which was sent before that write)."""
        if waits.under_way is None:
            waits.under_way = self._send_wait(pipe, waits)
            return waits.under_way
        if waits.next is None:
            waits.next = asyncio.get_running_loop().create_future()
        return waits.next

    def _send_wait(self, pipe: PipelinedConnection, waits: _Waits) -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        wait = asyncio.ensure_future(pipe.call("WAIT", self.replicas, self.wait_ms))
        wait.add_done_callback(lambda answer: self._answered(pipe, waits, done, answer))
        return done

    def _answered(self, pipe: PipelinedConnection, waits: _Waits, done: asyncio.Future[bool],
                  answer: asyncio.Future[Any]) -> None:
        acked = (not answer.cancelled() and answer.exception() is None
                 and int(answer.result()) >= self.replicas)
        _resolve(done, acked)
        if not acked:
            waits.lagging_until = time.monotonic() + LAG_PROBE_S
        waits.under_way, covered = None, waits.next
        waits.next = None
        if covered is None:
            return
        if not acked:
            # replication lags (or the connection failed): those settles are not confirmed
            # either, and asking again now would only hold them for another wait
            _resolve(covered, False)
            return
        waits.under_way = self._send_wait(pipe, waits)
        waits.under_way.add_done_callback(lambda then: _resolve(covered, then.result()))


def _resolve(future: asyncio.Future[bool], acked: bool) -> None:
    if not future.done():
        future.set_result(acked)
