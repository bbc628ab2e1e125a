"""systemd readiness and liveness of one serving process (ops/sdnotify.py speaks the protocol).

Alone (`--workers 1`), the process notifies systemd itself: READY=1 once Redis answers and the
function library is loaded, WATCHDOG=1 from the event loop every half WatchdogSec, STOPPING=1
on shutdown. As a worker, it beats into its `WorkerHeartbeats` slot instead (from the event
loop, once Redis and the library are up), and the supervisor speaks for all (cli/main.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from ratelimitd.errors import StoreUnavailable
from ratelimitd.http.app_keys import LIVE
from ratelimitd.ops.sdnotify import SystemdNotifier, WorkerHeartbeats

log = logging.getLogger("ratelimitd")
BEAT_INTERVAL_S: Final = 1.0
_RETRY_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class Liveness:
    """Who this process reports to: systemd directly, or the supervisor's heartbeats."""

    notifier: SystemdNotifier | None = None
    beats: WorkerHeartbeats | None = None
    worker: int = 0


async def _until_store_ready(app: web.Application) -> None:
    """Returns once Redis answers and the library is loaded (loading it if needed)."""
    while True:
        try:
            await app[LIVE].services.engine.ready()
            return
        except StoreUnavailable as exc:
            log.info("not ready yet: %s", exc)
            await asyncio.sleep(_RETRY_S)


async def _report(app: web.Application, liveness: Liveness) -> None:
    await _until_store_ready(app)
    if liveness.beats is not None:
        await liveness.beats.beat_forever(liveness.worker, BEAT_INTERVAL_S)
    elif liveness.notifier is not None:
        liveness.notifier.ready("serving")
        liveness.notifier.start_watchdog()


def liveness_ctx(liveness: Liveness) -> Callable[[web.Application], AsyncIterator[None]]:
    """For app.cleanup_ctx, after the services context."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_report(app, liveness), name="liveness")
        yield
        if liveness.notifier is not None:
            liveness.notifier.stopping()
            await liveness.notifier.stop_watchdog()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
