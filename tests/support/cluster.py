"""Real Redis topologies on loopback for the scale tests: a Redis Cluster (primaries, and
replicas when asked) and a Sentinel group (primary, replica, three sentinels).

Every process is a real redis-server on a free port; a missing binary fails loudly
(redis_binary). The cluster is assembled with plain commands (CLUSTER ADDSLOTSRANGE, MEET,
REPLICATE), so redis-cli is not needed. Timeouts are short (node timeout 1 s, sentinel
down-after 1 s) so that a failover completes within a test.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.support.redis_servers import RedisServer, free_port, redis_binary

SLOTS = 16384
NODE_TIMEOUT_MS = 1000


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def _cluster_node(workdir: Path) -> RedisServer:
    bus = free_port()
    node = RedisServer(workdir, extra=[
        "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf"),
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-port", str(bus),
        # a replica may take over at once, however long it was cut off
        "--cluster-replica-validity-factor", "0",
        "--cluster-allow-reads-when-down", "no"])
    node.bus_port = bus  # type: ignore[attr-defined]
    return node


def _meet(client: redis.Redis, node: RedisServer) -> None:
    bus = node.bus_port  # type: ignore[attr-defined]
    client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)


class LocalCluster:
    """`primaries` primaries sharing the slots evenly, each with `replicas` replicas."""

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 0) -> None:
        self.primaries = [_cluster_node(workdir / f"p{i}") for i in range(primaries)]
        self.replicas = [_cluster_node(workdir / f"r{i}") for i in range(primaries * replicas)]
        try:
            self._assemble(replicas)
        except BaseException:
            self.stop()
            raise

    @property
    def nodes(self) -> list[RedisServer]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.primaries[0].port}"

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=2)

    def _assemble(self, replicas: int) -> None:
        per = SLOTS // len(self.primaries)
        for i, node in enumerate(self.primaries):
            last = SLOTS - 1 if i == len(self.primaries) - 1 else (i + 1) * per - 1
            self.client(node).execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        first = self.client(self.primaries[0])
        for node in self.nodes[1:]:
            _meet(first, node)
        wait_until(lambda: all(self._knows_all(n) for n in self.nodes), 20,
                   "every node to know every other")
        for i, node in enumerate(self.replicas):
            primary = self.primaries[i // replicas]
            primary_id = self.client(primary).execute_command("CLUSTER", "MYID")
            self.client(node).execute_command("CLUSTER", "REPLICATE", primary_id)
        self.wait_ok()
        for node in self.replicas:
            wait_until(lambda n=node: self._replica_synced(n), 20, "replicas to sync")

    def _knows_all(self, node: RedisServer) -> bool:
        nodes = self.client(node).execute_command("CLUSTER", "NODES").decode()
        return len(nodes.strip().splitlines()) == len(self.nodes) and "handshake" not in nodes

    def _replica_synced(self, node: RedisServer) -> bool:
        info = self.client(node).info("replication")
        return info.get("master_link_status") == "up"

    def wait_ok(self, seconds: float = 20) -> None:
        """Until every live node reports cluster_state:ok and agrees on the slot owners."""
        def ok() -> bool:
            maps = []
            for node in self.nodes:
                if node.proc.poll() is not None:
                    continue
                client = self.client(node)
                if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
                maps.append(sorted((s[0], s[1], s[2][1]) for s in
                                   client.execute_command("CLUSTER", "SLOTS")))
            return all(m == maps[0] for m in maps)
        wait_until(ok, seconds, "the cluster to be ok")

    def primary_of(self, key: str) -> RedisServer:
        slot = self.slot_of(key)
        for node in self.nodes:
            if node.proc.poll() is not None:
                continue
            for start, end, owner, *_ in self.client(node).execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(owner[1]))
        raise RuntimeError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """Reshards one slot the way redis-cli does: IMPORTING / MIGRATING, MIGRATE every key,
        then SETSLOT NODE on every primary."""
        self.start_migration(slot, source, target)
        self.finish_migration(slot, source, target)

    def start_migration(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """The first half of a resharding: the slot's keys moved, its owner not yet changed
        (the source answers ASK for keys it no longer has)."""
        src, dst = self.client(source), self.client(target)
        src_id = src.execute_command("CLUSTER", "MYID")
        dst_id = dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)

    def finish_migration(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        dst_id = self.client(target).execute_command("CLUSTER", "MYID")
        for node in [target, source, *self.primaries]:
            if node.proc.poll() is None and self._is_primary(node):
                # a primary left without slots turns into a replica of their new owner
                self.client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        self.wait_ok()

    def add_primary(self, workdir: Path) -> RedisServer:
        """A new, empty primary that joins the cluster (it serves no slot until one moves)."""
        node = _cluster_node(workdir)
        self.primaries.append(node)
        _meet(self.client(self.primaries[0]), node)
        wait_until(lambda: all(self._knows_all(n) for n in self.nodes), 20,
                   "every node to know the new one")
        self.wait_ok()
        return node

    def slot_of(self, key: str) -> int:
        live = next(n for n in self.nodes if n.proc.poll() is None)
        return int(self.client(live).execute_command("CLUSTER", "KEYSLOT", key))

    def flushall(self) -> None:
        for node in self.primaries:
            if node.proc.poll() is None and self._is_primary(node):
                self.client(node).flushall()

    def _is_primary(self, node: RedisServer) -> bool:
        return bool(self.client(node).info("replication")["role"] == "master")

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait(10)


class SentinelGroup:
    """A primary, one replica, three sentinels watching them as service `mymaster`."""

    SERVICE = "mymaster"

    def __init__(self, workdir: Path) -> None:
        self.primary = RedisServer(workdir / "primary")
        self.replica = RedisServer(workdir / "replica",
                                   extra=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []
        try:
            wait_until(lambda: redis.Redis(port=self.replica.port).info("replication")
                       .get("master_link_status") == "up", 20, "the replica to sync")
            for i in range(3):
                self._start_sentinel(workdir / f"sentinel{i}")
            wait_until(self._sentinels_see_replica, 20, "the sentinels to find the replica")
        except BaseException:
            self.stop()
            raise

    def _start_sentinel(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = workdir / "sentinel.conf"  # a sentinel rewrites its file: one each
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 10000\n"
            f"sentinel parallel-syncs {self.SERVICE} 1\n")
        self.sentinels.append(subprocess.Popen([redis_binary(), str(conf), "--sentinel"],
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.STDOUT))
        self.sentinel_ports.append(port)

    def _sentinels_see_replica(self) -> bool:
        for port in self.sentinel_ports:
            replicas: Any = redis.Redis(port=port).execute_command(
                "SENTINEL", "REPLICAS", self.SERVICE)
            if not replicas:
                return False
            others: Any = redis.Redis(port=port).execute_command(
                "SENTINEL", "SENTINELS", self.SERVICE)
            if len(others) < 2:
                return False
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}"

    def master_port(self) -> int:
        reply: Any = redis.Redis(port=self.sentinel_ports[0]).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(reply[1])

    def restart(self, server: RedisServer) -> None:
        """Starts a killed server again on its port; the sentinels make it a replica of the
        primary of the moment."""
        server.proc = subprocess.Popen(
            [redis_binary(), "--port", str(server.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(server.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for proc in [*self.sentinels, self.primary.proc, self.replica.proc]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
