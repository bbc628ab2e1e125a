"""Connections to Redis: standalone, cluster or sentinel, with bounded pools and timeouts."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from ratelimitd.config import RedisConfig
from ratelimitd.scripts import RedisClient

# Concurrent Redis calls one daemon process may have; more wait (up to the timeout) for a free
# connection instead of opening sockets without bound.
MAX_CONNECTIONS: Final = 64


def connect(config: RedisConfig, url: str) -> RedisClient:
    """A client for `url` (the configured one, or the embedded server's unix socket)."""
    timeout = config.timeout_ms / 1000
    if config.mode == "cluster":
        return RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                     max_connections=MAX_CONNECTIONS)
    if config.mode == "sentinel":
        return _sentinel_master(url, timeout)
    pool = BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=timeout,
                                           socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
    return Redis(connection_pool=pool)


def _sentinel_master(url: str, timeout: float) -> Redis:
    """redis+sentinel://host:port[,host:port]/service_name -> the service's current master."""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host.strip("[]"), int(port or 26379)))
    service = parts.path.strip("/")
    sentinel = Sentinel(hosts, socket_timeout=timeout,  # type: ignore[no-untyped-call]
                        socket_connect_timeout=timeout, password=parts.password)
    master: Redis = sentinel.master_for(service, socket_timeout=timeout,
                                        password=parts.password)
    return master
