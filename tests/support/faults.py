"""Faults on demand, for the fault tests (tests/quota/test_faults*.py, test_properties.py).

* `DurableRedis`: a real redis-server whose process a test can stall (SIGSTOP / SIGCONT) and
  kill (SIGKILL) and restart on the same port with its data (AOF, fsync on every write, so
  whatever Redis answered survives the kill).
* `DurableCluster`: three such servers as a real 3-primary Redis Cluster (`redis-cli --cluster
  create`); a node restarts on its port with its nodes.conf and rejoins.
* `FaultyTransport`: the engine's Transport around a real one (real Redis), failing the calls
  a test names: before they are sent (Redis never runs them) or after (Redis ran them, the
  reply is lost), the way a timeout or a dropped connection fails them; or holding a call
  until the test lets it on (`hold`), to order two reserves step by step.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from ratelimitd.errors import StoreUnavailable
from ratelimitd.store.transport import Transport
from tests.support.redis_servers import free_port, redis_binary

START_TIMEOUT_S = 10.0
CLUSTER_BUS_OFFSET = 10_000


def command(port: int, *args: Any, timeout_s: float = 1.0) -> Any:
    """One command to the server on `port`, on a connection of its own."""
    client = redis.Redis(port=port, socket_timeout=timeout_s)
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


class DurableRedis:
    """One redis-server on 127.0.0.1 with an append-only file fsynced on every write."""

    def __init__(self, workdir: Path, extra: Sequence[str] = (), port: int | None = None
                 ) -> None:
        self.port = free_port() if port is None else port
        self.workdir = workdir
        self.extra = list(extra)
        workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
                *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                # a restarted server answers LOADING until its AOF is read
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.02)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stall(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        assert self.proc is not None
        self._signal(signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGCONT)       # a stopped process does not act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)


class DurableCluster:
    """Three DurableRedis primaries made one Redis Cluster, all 16384 slots covered.

    The node timeout is long, so a node that is stalled or restarting for a few seconds is not
    declared failed: the cluster answers for the other nodes' slots meanwhile, as a cluster
    with replicas would until a failover."""

    def __init__(self, workdir: Path) -> None:
        self.nodes: list[DurableRedis] = []
        for k in range(3):
            node_dir = workdir / f"node{k}"
            self.nodes.append(DurableRedis(node_dir, port=_cluster_port(), extra=[
                "--cluster-enabled", "yes", "--enable-debug-command", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "60000"]))
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=60)
        self.wait_ok()
        self.url = f"redis://127.0.0.1:{self.nodes[0].port}"

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node says the cluster is ok."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            while b"cluster_state:ok" not in command(node.port, "CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not become ok")
                time.sleep(0.05)

    def node_of(self, key: str) -> DurableRedis:
        """The primary that holds `key`'s slot."""
        slot = command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key)
        for first, last, owner, *_ in command(self.nodes[0].port, "CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return next(n for n in self.nodes if n.port == int(owner[1]))
        raise LookupError(key)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 more) is free too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


When = Literal["before", "after"]


@dataclass
class _Fault:
    matches: Callable[[str, Sequence[Any]], bool]
    when: When
    times: int


@dataclass
class Gate:
    """A call held before it is sent: `arrived` is set when it gets here, `go` lets it on."""

    matches: Callable[[str, Sequence[Any]], bool]
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    used: bool = False


def on(subject_tag: str, function_suffix: str = "") -> Callable[[str, Sequence[Any]], bool]:
    """Matches the calls on one subject's hash slot (args: numkeys, K, R, ...), of the
    functions whose name ends with `function_suffix` ("reserve", "settle"; "" any)."""
    key = f"rl:{{{subject_tag}}}"
    return lambda function, args: args[1] == key and function.endswith(function_suffix)


@dataclass
class FaultyTransport:
    """A Transport that passes every call to `inner` (a real one) but the ones a test marked.

    `fail(matches, when)` makes the next `times` calls for which matches(function, args) is
    true fail with StoreUnavailable: "before" without sending them (Redis never runs them),
    "after" once Redis has run them (the reply is lost, as on a timeout). `failed` lists
    (function, args, when) of every call failed so far."""

    inner: Transport
    faults: list[_Fault] = field(default_factory=list)
    failed: list[tuple[str, Sequence[Any], When]] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    lost_replies: list[Any] = field(default_factory=list)   # of the calls failed "after"

    def hold(self, matches: Callable[[str, Sequence[Any]], bool]) -> Gate:
        """Holds the next matching call before it is sent, until the gate's `go` is set."""
        gate = Gate(matches)
        self.gates.append(gate)
        return gate

    def fail(self, matches: Callable[[str, Sequence[Any]], bool], when: When,
             times: int = 1) -> _Fault:
        """Fails the next `times` matching calls (set the fault's `times` to 0 to stop)."""
        fault = _Fault(matches, when, times)
        self.faults.append(fault)
        return fault

    def _take(self, function: str, args: Sequence[Any]) -> When | None:
        for fault in self.faults:
            if fault.times > 0 and fault.matches(function, args):
                fault.times -= 1
                self.failed.append((function, args, fault.when))
                return fault.when
        return None

    def fcall(self, function: str, args: Sequence[Any]) -> Awaitable[Any]:
        return self._fcall(function, args, self._take(function, args))

    async def _fcall(self, function: str, args: Sequence[Any], when: When | None) -> Any:
        for gate in self.gates:
            if not gate.used and gate.matches(function, args):
                gate.used = True
                gate.arrived.set()
                await gate.go.wait()
                break
        if when == "before":
            raise StoreUnavailable("injected: the call never reached Redis", timeout=True)
        reply = await self.inner.fcall(function, args)
        if when == "after":
            self.lost_replies.append(reply)
            raise StoreUnavailable("injected: Redis ran the call, its reply was lost",
                                   timeout=True)
        return reply

    async def fcall_acked(self, function: str, args: Sequence[Any]) -> tuple[Any, bool | None]:
        """The faults apply as to fcall (the wrapped transports ask no acknowledgement)."""
        return await self._fcall(function, args, self._take(function, args)), None

    async def load_library(self, source: str) -> None:
        await self.inner.load_library(source)

    async def has_library(self, name: str) -> bool:
        return await self.inner.has_library(name)

    async def execute(self, *args: Any) -> Any:
        return await self.inner.execute(*args)

    async def aclose(self) -> None:
        await self.inner.aclose()
