"""Connections to Redis: standalone, cluster or sentinel, with bounded pools and timeouts.

redis-py serves every mode and every feature; the hot path's calls go through a Transport
(transport.py): on a standalone Redis over TCP or a unix socket, a PipelinedConnection of its
own. `open_store` builds both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeGuard
from urllib.parse import quote, urlsplit

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError
from redis.typing import EncodableT

from ratelimitd.config import RedisConfig
from ratelimitd.errors import StoreUnavailable
from ratelimitd.store.cluster import ClusterTransport
from ratelimitd.store.pipeline import PipelinedConnection
from ratelimitd.store.replication import ReplicaAck
from ratelimitd.store.transport import BatchTransport, PipeTransport, Transport

RedisClient = Redis | RedisCluster


def is_cluster(client: RedisClient) -> TypeGuard[RedisCluster]:
    """Whether `client` speaks to a Redis Cluster (not to one standalone Redis)."""
    return isinstance(client, RedisCluster)

# Concurrent Redis calls one daemon process may have through redis-py; past it a call fails
# (503) at once instead of opening sockets without bound.
MAX_CONNECTIONS: Final = 64


class _HiredisPacking(AbstractConnection):
    """redis-py packs commands with hiredis (C) on sync connections but in Python on asyncio
    ones, where that is most of a call's client CPU; this packs them with hiredis too. The
    bytes on the wire are the same."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD": two words on the wire
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]  # type: ignore[arg-type]  # stub: 1-tuple


class HiredisConnection(_HiredisPacking, Connection):
    pass


class HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


_HIREDIS_CLASSES: Final[dict[type[AbstractConnection], type[AbstractConnection]]] = {
    Connection: HiredisConnection, UnixDomainSocketConnection: HiredisUnixConnection,
    SSLConnection: HiredisSSLConnection,
}


@dataclass(frozen=True, slots=True)
class Store:
    """One daemon process's connections to Redis: redis-py's `client` for everything, and the
    `transport` the quota engine's calls take."""

    client: RedisClient
    transport: Transport

    async def aclose(self) -> None:
        await self.transport.aclose()
        await self.client.aclose()


def open_store(config: RedisConfig, url: str) -> Store:
    """The connections for `url` (the configured one, or the embedded server's unix socket);
    nothing connects until the first call. The hot path pipelines in every mode but TLS."""
    client = connect(config, url)
    timeout = config.timeout_ms / 1000
    acks = ReplicaAck.for_timeout(config.replicas_ack, config.timeout_ms)
    if config.mode == "cluster" and url.startswith("redis://"):
        return Store(client, ClusterTransport(url, timeout, acks))
    if config.mode == "sentinel":
        return Store(client, PipeTransport(
            _sentinel_pipe(url, timeout), timeout, acks,
            _sentinel_pipe(url, timeout) if acks is not None else None))
    if url.startswith(("redis://", "unix://")):
        return Store(client, PipeTransport(
            PipelinedConnection(url, timeout), timeout, acks,
            PipelinedConnection(url, timeout) if acks is not None else None))
    return Store(client, BatchTransport(client, timeout))


def _sentinel_pipe(url: str, timeout: float) -> PipelinedConnection:
    """A pipelined connection to the service's primary of the moment: the sentinels are asked
    at each (re)connection, and a primary that became a replica answers READONLY, which closes
    the connection (pipeline.py), so the daemon follows a failover by itself."""
    hosts, service, password = _sentinel_parts(url)
    sentinel = Sentinel(hosts, socket_timeout=timeout,
                        socket_connect_timeout=timeout, password=password)

    async def locate() -> tuple[str, int]:
        try:
            host, port = await sentinel.discover_master(service)
        except RedisError as exc:
            raise StoreUnavailable(f"sentinel: {exc}") from exc
        return str(host), int(port)

    auth = f":{quote(password, safe='')}@" if password else ""
    return PipelinedConnection(f"redis://{auth}sentinel-primary", timeout, locate=locate)


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, str | None]:
    """redis+sentinel://[:password@]host:port[,host:port]/service_name"""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host.strip("[]"), int(port or 26379)))
    return hosts, parts.path.strip("/"), parts.password


def connect(config: RedisConfig, url: str) -> RedisClient:
    """A client for `url` (the configured one, or the embedded server's unix socket)."""
    timeout = config.timeout_ms / 1000
    if config.mode == "cluster":
        return RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                     max_connections=MAX_CONNECTIONS)
    if config.mode == "sentinel":
        return _sentinel_master(url, timeout)
    pool = ConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS,
                                   socket_connect_timeout=timeout, socket_timeout=timeout)
    # from_url picks the class from the url's scheme; swap in its hiredis-packing twin
    pool.connection_class = _HIREDIS_CLASSES.get(pool.connection_class, pool.connection_class)
    return Redis(connection_pool=pool)


def _sentinel_master(url: str, timeout: float) -> Redis:
    """redis+sentinel://host:port[,host:port]/service_name -> the service's current master."""
    hosts, service, password = _sentinel_parts(url)
    sentinel = Sentinel(hosts, socket_timeout=timeout,
                        socket_connect_timeout=timeout, password=password)
    master: Redis = sentinel.master_for(service, socket_timeout=timeout, password=password)
    return master
