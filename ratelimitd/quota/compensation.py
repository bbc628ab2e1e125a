"""Cancelling reserve attempts that failed partway, until Redis takes the cancel.

A reserve that fails after it reached some subjects (a timeout, a lost connection, a script
error) may have charged them, or may still charge them: a call that timed out can run late.
Each such subject gets a cancel of that attempt (settle's MODE_CANCEL), which refunds the
attempt's charge if it ran and bars it if it has not. The first cancel is tried at once; what
fails waits here and is tried again with exponential backoff until it lands or the
reservation's lifetime has passed (by then the record a cancel would bar has expired). The queue
is bounded: past it, the oldest pending cancel is dropped and counted. What this cannot cover is
said in docs/design.md: a daemon killed before its cancels land.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from ratelimitd.errors import StoreUnavailable

log = logging.getLogger("ratelimitd.quota")

MAX_PENDING: Final = 100_000
FIRST_DELAY_S: Final = 0.05
MAX_DELAY_S: Final = 5.0

Cancel = Callable[[str, str, int], Awaitable[object]]


@dataclass(slots=True)
class _Pending:
    tag: str
    rand: str
    attempt: int
    deadline: float                    # monotonic seconds


@dataclass(slots=True)
class Compensator:
    """Retries cancels in one background task, started on first need."""

    cancel: Cancel                     # (subject tag, rand, attempt) -> raises StoreUnavailable
    lifetime_s: float
    pending: deque[_Pending] = field(default_factory=deque)
    dropped: int = 0
    _task: asyncio.Task[None] | None = None

    async def cancel_now(self, targets: list[tuple[str, str, int]]) -> None:
        """Cancels each (tag, rand, attempt); what fails is retried in the background."""
        for tag, rand, attempt in targets:
            try:
                await self.cancel(tag, rand, attempt)
            except StoreUnavailable:
                self._enqueue(_Pending(tag, rand, attempt, time.monotonic() + self.lifetime_s))

    def _enqueue(self, item: _Pending) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
            log.error("compensation queue full: a cancel was dropped (%d so far)", self.dropped)
        self.pending.append(item)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = FIRST_DELAY_S
        while self.pending:
            await asyncio.sleep(delay)
            delay = await self._drain(delay)

    async def _drain(self, delay: float) -> float:
        """Cancels one after another while Redis takes them (a queue left by an outage
        drains at Redis speed, not one per delay); returns the delay before the next try."""
        while self.pending:
            item = self.pending[0]
            if time.monotonic() > item.deadline:
                self.pending.popleft()
                log.error("a cancel did not reach Redis within the reservation's lifetime")
                continue
            try:
                await self.cancel(item.tag, item.rand, item.attempt)
            except StoreUnavailable:
                return min(delay * 2, MAX_DELAY_S)
            self.pending.popleft()
        return FIRST_DELAY_S

    async def aclose(self) -> None:
        """Stops retrying; what is pending then is logged."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.pending:
            log.error("stopping with %d cancels not yet in Redis", len(self.pending))
