"""Supervising the embedded redis-server: restart it when it dies, tell /healthz, give up.

A thread of the daemon's main process waits on the redis-server it started. When it exits
while the daemon runs (killed, crashed, OOM), the thread restarts it after a backoff that
doubles with each death (0.25 s up to 8 s); after `MAX_RESTARTS` deaths within
`RESTART_WINDOW_S` it gives up and stops the daemon with a failure status, so that its service
manager restarts the whole daemon. The serving processes (forked workers too) read the state
from shared memory (`StoreHealth`): /healthz answers 503 while the server is down.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Final

from ratelimitd.errors import EmbeddedRedisError
from ratelimitd.store.embedded import EmbeddedRedis

log = logging.getLogger("ratelimitd.store")

MAX_RESTARTS: Final = 5
RESTART_WINDOW_S: Final = 300.0
FIRST_BACKOFF_S: Final = 0.25
MAX_BACKOFF_S: Final = 8.0

_UP, _RESTARTING, _FAILED = 0, 1, 2


class StoreHealth:
    """The embedded Redis's state, in memory shared with forked worker processes."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._state = context.RawValue("i", _UP)
        self._deaths = context.RawValue("i", 0)

    def problem(self) -> str | None:
        """None while the embedded redis-server runs, else what is wrong."""
        state = self._state.value
        if state == _UP:
            return None
        if state == _RESTARTING:
            return f"restarting the embedded redis-server (it died {self._deaths.value} times)"
        return "the embedded redis-server keeps dying; the daemon is stopping"

    def set(self, state: int, deaths: int) -> None:
        self._deaths.value = deaths
        self._state.value = state


class Supervisor:
    """Watches one EmbeddedRedis from a thread; `on_give_up` is called (from that thread)
    when it cannot keep it running."""

    def __init__(self, embedded: EmbeddedRedis, health: StoreHealth,
                 on_give_up: Callable[[], None]) -> None:
        self.embedded = embedded
        self.health = health
        self.failed = False
        self._on_give_up = on_give_up
        self._stopping = threading.Event()
        self._deaths: collections.deque[float] = collections.deque()
        self._thread: threading.Thread | None = None

    def watch(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ratelimitd-redis-supervisor",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the server (no restart follows) and the watching thread."""
        self._stopping.set()
        self.embedded.release()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            proc = self.embedded.proc
            if proc is None:
                return
            status = proc.wait()  # reaps it: no zombie
            if self._stopping.is_set():
                return
            if not self._restart(status):
                self.failed = True
                self.health.set(_FAILED, len(self._deaths))
                log.error("the embedded redis-server died %d times within %.0f s; giving up "
                          "and stopping the daemon (exit status 1)", len(self._deaths),
                          RESTART_WINDOW_S)
                self._on_give_up()
                return

    def _restart(self, status: int) -> bool:
        """Restarts after a backoff; False when the deaths are too many (or it cannot)."""
        while True:
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
                self._deaths.popleft()
            deaths = len(self._deaths)
            self.health.set(_RESTARTING, deaths)
            if deaths > MAX_RESTARTS:
                return False
            backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (deaths - 1))
            log.error("the embedded redis-server exited with status %s; restarting it in "
                      "%.2f s (death %d of %d allowed within %.0f s)", status, backoff, deaths,
                      MAX_RESTARTS, RESTART_WINDOW_S)
            if self._stopping.wait(backoff):
                return True
            try:
                self.embedded.spawn()
            except EmbeddedRedisError as exc:
                log.error("restarting the embedded redis-server failed: %s", exc)
                status = -1
                continue
            self.health.set(_UP, deaths)
            log.info("the embedded redis-server runs again (pid %d)",
                     self.embedded.proc.pid if self.embedded.proc else -1)
            return True
