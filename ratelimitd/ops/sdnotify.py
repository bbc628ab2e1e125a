"""The systemd notify protocol, spoken directly over $NOTIFY_SOCKET (no libsystemd, no package).

A `Type=notify` service tells systemd it is ready (READY=1), reloading (RELOADING=1), stopping
(STOPPING=1) and alive (WATCHDOG=1) by sending newline-separated `KEY=VALUE` datagrams to the
AF_UNIX socket named in $NOTIFY_SOCKET: a path, or `@name` for the abstract namespace. Without
$NOTIFY_SOCKET (run by hand, in tests, in a container) every call is a no-op.

The watchdog pings from an asyncio task, so it pings only while the event loop turns: a loop
stuck in a long call stops pinging and systemd restarts the service after `WatchdogSec`.

With `--workers N` the supervisor is the main process systemd listens to (NotifyAccess=main,
WATCHDOG_PID): each worker beats into a `WorkerHeartbeats` slot from its event loop, and the
supervisor sends READY=1 once every worker has beaten and WATCHDOG=1 only while every beat is
fresh, so one stuck worker is enough to get the daemon restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

log = logging.getLogger("ratelimitd.sdnotify")

# systemd reads at most PIPE_BUF (4096) bytes of one notification datagram
MAX_MESSAGE_BYTES: Final = 4096
MAX_STATUS_CHARS: Final = 512


def notify_address(value: str) -> str | None:
    """$NOTIFY_SOCKET as a socket address: `@name` is abstract (a leading NUL), `/path` a file.

    Anything else (a relative path, `vsock:` of systemd 253+ inside VMs) is not supported and
    answers None, so the caller stays silent rather than guessing."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class SystemdNotifier:
    """One process's channel to systemd. Build it once at startup; close() at exit.

    `environ` defaults to os.environ; tests pass their own."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = notify_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", raw)
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._stopping_sent = False
        self._warned = False
        self.watchdog_usec = _watchdog_usec(env)
        self._watchdog_task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between pings (half of WatchdogSec, as sd_watchdog_enabled(3) advises), or
        None when systemd expects none from this process."""
        if self._address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Sends one datagram of `KEY=VALUE` fields; True when it was sent.

        Never raises: systemd gone (or a full queue) must not take the daemon down. Non-blocking,
        so it is safe to call from the event loop. Silent in a process forked after this object
        was made: systemd listens to the main process only (NotifyAccess=main)."""
        if self._address is None or os.getpid() != self._pid:
            return False
        message = "\n".join(fields).encode()
        if len(message) > MAX_MESSAGE_BYTES:
            log.warning("notify message of %d bytes not sent (at most %d)", len(message),
                        MAX_MESSAGE_BYTES)
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._warned:  # once: a watchdog would repeat it every few seconds
                log.warning("cannot notify systemd on %s: %s", _printable(self._address), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (systemd 253's Type=notify-reload requires the
        timestamp; older versions ignore it). Send ready() when the reload is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1, once: the serve loop sends it on SIGTERM, the cleanup again is a no-op."""
        if self._stopping_sent:
            return False
        self._stopping_sent = True
        return self.notify("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Pings every half WatchdogSec, from the event loop, until cancelled."""
        interval = self.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """Starts run_watchdog() on the running loop (no task when no watchdog is expected)."""
        if self.watchdog_interval_s is None or self._watchdog_task is not None:
            return self._watchdog_task
        self._watchdog_task = asyncio.get_running_loop().create_task(
            self.run_watchdog(), name="systemd-watchdog")
        return self._watchdog_task

    async def stop_watchdog(self) -> None:
        task, self._watchdog_task = self._watchdog_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cleanup_ctx(self, app: Any) -> AsyncIterator[None]:
        """For `app.cleanup_ctx.append(notifier.cleanup_ctx)`, appended after the context that
        connects Redis and loads the library: READY=1 and the watchdog once those are up,
        STOPPING=1 (if the serve loop has not sent it yet) and no more pings on cleanup."""
        self.start_watchdog()
        self.ready(f"serving (pid {os.getpid()})")
        yield
        self.stopping()
        await self.stop_watchdog()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID, when set, names it)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # a forked worker, or a child that inherited the environment
    return int(usec)


def _status(text: str | None) -> tuple[str, ...]:
    # one line (a newline would start a field of its own), and short: systemctl status shows it
    return () if text is None else ("STATUS=" + " ".join(text.splitlines())[:MAX_STATUS_CHARS],)


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


class WorkerHeartbeats:
    """Per-worker last-beat times in shared memory, made by the supervisor before it forks.

    Worker i runs `beat_forever(i)` on its event loop; the supervisor asks `all_started()` (then
    READY=1) and `all_fresh(max_age_s)` (then WATCHDOG=1). A plain array of doubles, one writer
    per slot, no lock: a torn read is impossible for an aligned double on the platforms we run
    on, and a stale one only delays a ping. Beside them, how many reloads the supervisor has
    passed on: a worker that was still starting then (SIGHUP ignored) reloads once it can."""

    def __init__(self, workers: int, context: Any = None) -> None:
        ctx = context if context is not None else multiprocessing.get_context("fork")
        self._beats: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, workers)
        self._reloads: ctypes.c_long = ctx.RawValue(ctypes.c_long, 0)
        self.workers = workers

    def reload_sent(self) -> None:
        """The supervisor, before it sends the workers SIGHUP."""
        self._reloads.value += 1

    @property
    def reloads_sent(self) -> int:
        return int(self._reloads.value)

    def beat(self, worker: int) -> None:
        self._beats[worker] = time.monotonic()

    async def beat_forever(self, worker: int, interval_s: float) -> None:
        while True:
            self.beat(worker)
            await asyncio.sleep(interval_s)

    def reset(self, worker: int) -> None:
        """A restarted worker must beat anew before it counts as up."""
        self._beats[worker] = 0.0

    def all_started(self) -> bool:
        return all(b > 0.0 for b in self._beats)

    def all_fresh(self, max_age_s: float) -> bool:
        now = time.monotonic()
        return all(b > 0.0 and now - b <= max_age_s for b in self._beats)

    def stale(self, max_age_s: float) -> list[int]:
        """The workers whose last beat is older than max_age_s (or that never beat)."""
        now = time.monotonic()
        return [i for i, b in enumerate(self._beats) if b == 0.0 or now - b > max_age_s]
