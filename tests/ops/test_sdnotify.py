"""The notify protocol over a real AF_UNIX datagram socket, as systemd listens on it."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from aiohttp import web

from ratelimitd.ops.sdnotify import SystemdNotifier, WorkerHeartbeats, notify_address


class Listener:
    """The systemd side: a bound datagram socket, read without blocking."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    def wait(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        finally:
            self.sock.setblocking(False)


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify.sock")
    listener = Listener(path)
    yield listener, path
    listener.sock.close()


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval_s is None
    assert notifier.start_watchdog() is None


def test_ready_status_stopping_over_a_path_socket(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("serving\non 127.0.0.1:8080")
    assert listener.wait() == "READY=1\nSTATUS=serving on 127.0.0.1:8080"
    assert notifier.status("2 workers")
    assert listener.wait() == "STATUS=2 workers"
    assert notifier.stopping()
    assert listener.wait() == "STOPPING=1"
    assert notifier.stopping() is False  # once only
    assert listener.drain() == []
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"ratelimitd-test-{uuid.uuid4().hex}"
    listener = Listener("\0" + name)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert listener.wait() == "READY=1"
        notifier.close()
    finally:
        listener.sock.close()


def test_reloading_carries_the_monotonic_time(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = dict(line.split("=", 1) for line in listener.wait().split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    notifier.close()


def test_unsupported_addresses_disable_notifying() -> None:
    assert notify_address("relative/path") is None
    assert notify_address("vsock:2:1234") is None
    assert not SystemdNotifier({"NOTIFY_SOCKET": "relative"}).enabled


def test_nobody_listening_does_not_raise(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


async def test_watchdog_pings_from_the_loop_and_stops_when_the_loop_is_stuck(
        path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000",
                                "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == pytest.approx(0.05)
    notifier.start_watchdog()
    await asyncio.sleep(0.3)
    pings = listener.drain()
    assert len(pings) >= 3
    assert set(pings) == {"WATCHDOG=1"}
    time.sleep(0.3)  # noqa: ASYNC251 (the event loop is stuck on purpose: no ping may leave)
    assert listener.drain() == []
    await asyncio.sleep(0.2)  # unstuck: pings resume
    assert len(listener.drain()) >= 1
    await notifier.stop_watchdog()
    await asyncio.sleep(0.15)
    assert listener.drain() == []
    notifier.close()


def test_watchdog_meant_for_another_pid_is_not_ours(path_listener: tuple[Listener, str]) -> None:
    _, path = path_listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}
    assert SystemdNotifier(env).watchdog_interval_s == pytest.approx(0.05)  # no WATCHDOG_PID
    other = SystemdNotifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval_s is None
    assert SystemdNotifier({**env, "WATCHDOG_USEC": "0"}).watchdog_interval_s is None


async def test_cleanup_ctx_of_an_aiohttp_app(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    app = web.Application()
    app.cleanup_ctx.append(notifier.cleanup_ctx)
    runner = web.AppRunner(app)
    await runner.setup()
    assert listener.wait().startswith("READY=1\nSTATUS=serving")
    await asyncio.sleep(0.25)
    assert "WATCHDOG=1" in listener.drain()
    await runner.cleanup()
    assert listener.drain()[-1] == "STOPPING=1"
    await asyncio.sleep(0.2)
    assert listener.drain() == []  # the watchdog stopped with the app
    notifier.close()


def _worker(beats: WorkerHeartbeats, index: int, beats_for_s: float) -> None:
    async def run() -> None:
        task = asyncio.get_running_loop().create_task(beats.beat_forever(index, 0.02))
        await asyncio.sleep(beats_for_s)
        task.cancel()
    asyncio.run(run())


def test_worker_heartbeats_across_forked_workers() -> None:
    context = multiprocessing.get_context("fork")
    beats = WorkerHeartbeats(2, context)
    assert not beats.all_started()
    long_lived = context.Process(target=_worker, args=(beats, 0, 1.5))
    short_lived = context.Process(target=_worker, args=(beats, 1, 0.1))
    long_lived.start()
    short_lived.start()
    deadline = time.monotonic() + 5
    while not beats.all_started():
        assert time.monotonic() < deadline, "the workers' beats never arrived"
        time.sleep(0.01)
    short_lived.join(5)
    time.sleep(0.3)  # worker 1 stopped beating, worker 0 goes on
    assert beats.stale(0.2) == [1]
    assert not beats.all_fresh(0.2)
    beats.reset(1)
    assert not beats.all_started()
    long_lived.join(5)


def _notify_from_child(notifier: SystemdNotifier, out: Connection) -> None:
    out.send(notifier.ready())


def test_a_forked_child_stays_silent(path_listener: tuple[Listener, str]) -> None:
    """systemd listens to the main process only: a worker forked with the notifier says
    nothing (it would be refused, and logged as such, by systemd)."""
    listener, path = path_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_notify_from_child, args=(notifier, send))
    child.start()
    assert receive.recv() is False
    child.join(5)
    assert listener.drain() == []
    assert notifier.ready()
    assert listener.wait() == "READY=1"


def test_an_oversized_message_is_not_sent(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.notify("X=" + "y" * 5000) is False
    assert notifier.status("z" * 5000)
    assert listener.wait() == "STATUS=" + "z" * 512
