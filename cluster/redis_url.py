"""Which Redis a ``REDIS_URL`` names: one server, or a Redis Cluster; and clients for either.

A single server is any URL redis-py takes (``redis://``, ``rediss://``,
``unix://``). A Redis Cluster is named by the scheme ``redis+cluster://`` (or
``rediss+cluster://`` for TLS) followed by one or more seed nodes separated by
commas, with optional credentials once at the front:

    redis+cluster://[user:password@]host:port[,host:port…]

The seeds are only where the client starts: it reads the slot map from any of
them and follows it (failovers included). Everything that talks to Redis gets
its client here, so the single-server and cluster paths differ only where the
cluster needs it (see docs/OPERATIONS.md, "Redis Cluster").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS

AsyncClient = aioredis.Redis | AsyncRedisCluster
"""A command client for either kind of Redis (the cluster one routes each key to its shard)."""


class RedisUrlError(ValueError):
    """A ``REDIS_URL`` that names no Redis (said in one line)."""


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """The parts of a ``redis+cluster://`` URL."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.username:
            options["username"] = self.username
        if self.password:
            options["password"] = self.password
        if self.tls:
            options["ssl"] = True
        return options


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise RedisUrlError(f"not a Redis Cluster URL (redis+cluster://host:port[,host:port]): {scheme}://…")
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    username = password = None
    if "@" in rest:
        credentials, _, rest = rest.rpartition("@")
        user, colon, secret = credentials.partition(":")
        username, password = (unquote(user) or None, unquote(secret)) if colon else (None, unquote(user))
    seeds: list[tuple[str, int]] = []
    for part in rest.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise RedisUrlError(f"a Redis Cluster seed must be host:port, got {part.strip()!r}")
        seeds.append((host.strip("[]"), int(port)))
    return ClusterUrl(tuple(seeds), username, password, CLUSTER_SCHEMES[scheme.lower()])


def async_client(url: str, **options: Any) -> AsyncClient:
    """An asyncio command client: ``redis.asyncio.Redis``, or ``RedisCluster`` for a cluster URL."""
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(url, **options)
    parsed = parse_cluster_url(url)
    options.pop("max_connections", None)
    options.pop("health_check_interval", None)
    return AsyncRedisCluster(
        startup_nodes=[AsyncClusterNode(host, port) for host, port in parsed.seeds],
        **parsed.client_options(),
        **options,
    )


def sync_client(url: str, **options: Any) -> redis.Redis | RedisCluster:
    """A blocking command client for either kind of Redis."""
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **options)
    parsed = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.seeds],
        **parsed.client_options(),
        **options,
    )


def node_url(cluster_url: str, host: str, port: int) -> str:
    """A single-server URL for one node of the cluster (same credentials and TLS): for pub/sub connections."""
    parsed = parse_cluster_url(cluster_url)
    credentials = ""
    if parsed.password:
        credentials = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password, safe='')}@"
    return f"{'rediss' if parsed.tls else 'redis'}://{credentials}{host}:{port}/0"
