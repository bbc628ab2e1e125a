"""Durability on demand: `[redis] replicas_ack = N` makes each settle wait for N replicas.

Redis replicates asynchronously, so a failover may lose a primary's last writes. With N > 0,
every settle (commit, release: the calls that record what was really spent) is followed, on
the same pipelined connection and in the same write, by `WAIT N ms`: Redis answers it once N
replicas have acknowledged every write that connection made before it, the settle included.
Fewer acknowledgements within the wait fail the call with StoreUnavailable, so the gateway
sees an error and retries (a settle is idempotent: the retry answers "duplicate" and waits
again), never a success that a failover could undo. Reserves are not waited for: losing one
under-charges at most one reservation's estimate, which the next commit puts right.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

from redis.typing import EncodableT

from ratelimitd.errors import StoreUnavailable
from ratelimitd.store.pipeline import PipelinedConnection

# The library's settle entry point is registered as "<library name>_settle" (quota/library.py;
# tests/store/test_replicas_ack.py checks the shipped library keeps that name).
SETTLE_SUFFIX: Final = "_settle"


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    """Wait for `replicas` acknowledgements, at most `wait_ms`, after each settle."""

    replicas: int
    wait_ms: int

    @staticmethod
    def for_timeout(replicas: int, timeout_ms: int) -> ReplicaAck | None:
        """None when no acknowledgement is asked for. The wait takes at most three quarters
        of the call's timeout, so that WAIT's own answer (it answers with the count reached
        when its time is up) arrives before the connection's timer gives up on it."""
        if replicas <= 0:
            return None
        return ReplicaAck(replicas, max(1, timeout_ms * 3 // 4))

    def applies(self, function: str) -> bool:
        return function.endswith(SETTLE_SUFFIX)

    async def call(self, pipe: PipelinedConnection, command: tuple[EncodableT, ...]) -> Any:
        """`command`, then WAIT on the same connection: the command's reply once acknowledged."""
        replies: tuple[Any, Any] = await asyncio.gather(
            pipe.call(*command), pipe.call("WAIT", self.replicas, self.wait_ms),
            return_exceptions=True)
        reply, acks = replies
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(acks, BaseException):
            raise acks
        if int(acks) < self.replicas:
            raise StoreUnavailable(
                f"the write reached {acks} of the {self.replicas} replicas asked for "
                f"([redis] replicas_ack) within {self.wait_ms} ms; retry it")
        return reply
