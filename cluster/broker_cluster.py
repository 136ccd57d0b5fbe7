"""The node's bus on a Redis Cluster: sharded pub/sub for user channels, classic for the rest.

A Redis Cluster carries two kinds of pub/sub:

- sharded (SSUBSCRIBE/SPUBLISH): a channel lives on the master owning its slot,
  and only that shard handles its messages. User channels ``push:user:{<id>}``
  and the admin channels ``push:admin:{<n>}`` travel this way, so private
  events, the bulk of the bus, spread over the shards;
- classic (SUBSCRIBE/PSUBSCRIBE/PUBLISH): every message is broadcast to every
  node of the cluster. User and admin channels are held here too, so that a
  routed message sent with a plain PUBLISH (as another language may) arrives. ``events:<channel>`` (public and broadcast events, the
  plain-PUBLISH compatibility path, wildcard patterns) and ``spirit:events``
  stay classic: a wildcard subscription must see every channel it matches,
  and sharded messages are invisible to PSUBSCRIBE. Their cost is that every
  shard handles every public event (docs/OPERATIONS.md, "Redis Cluster").

:class:`ShardedBus` holds one classic connection (to a random master) and one
sharded connection per master, and offers the interface of one
:class:`~cluster.bus_reader.BusConnection` to :class:`ClusterBroker` (which is a
:class:`~cluster.broker.RedisBroker` otherwise). When any of them fails, the
whole set is dropped; the broker reconnects with backoff, and the next set is
opened after re-reading the slot map, so sharded channels are subscribed on the
master that owns them now (redis-py's own sharded pub/sub did not re-subscribe
after a master was SIGKILLed until the slot map was re-read). What was
published meanwhile is caught up from history by the node, as after any bus
outage.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from redis.asyncio.cluster import RedisCluster

from cluster.broker import REDIS_POOL_TIMEOUT_SECONDS, RedisBroker
from cluster.bus_reader import BusConnection, BusLink, MessageHandler
from cluster.bus_routing import ADMIN_CHANNEL, ADMIN_SHARD_PREFIX, BusName, admin_shard_channels, is_sharded
from cluster.redis_url import async_client, node_url

ADMIN_CHANNEL_BYTES = ADMIN_CHANNEL.encode()
ADMIN_SHARD_PREFIX_BYTES = ADMIN_SHARD_PREFIX.encode()


def _sharded_channels(name: BusName) -> tuple[str, ...]:
    """The sharded channels behind one bus name (``push:admin`` is spread over several)."""
    return admin_shard_channels() if name == ADMIN_CHANNEL else (name,)


class ShardedBus:
    """One node's pub/sub connections to a Redis Cluster, used as one connection."""

    def __init__(self, cluster: RedisCluster, classic: BusConnection, shards: dict[tuple[str, int], BusConnection]):
        self._cluster = cluster
        self.classic = classic
        self.shards = shards
        self.closed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        for conn in self._all():
            conn.closed.add_done_callback(self._component_closed)

    @classmethod
    async def open(
        cls,
        cluster: RedisCluster,
        url: str,
        handler: MessageHandler,
        on_error: Any,
        name: str,
    ) -> ShardedBus:
        """Re-read the slot map, then connect to every master (classic to one of them)."""
        await cluster.initialize()  # once per client: commands parser and first slot map
        await cluster.nodes_manager.initialize()  # every time: the slot map as it is now
        primaries = [(node.host, int(node.port)) for node in cluster.get_primaries()]
        if not primaries:
            raise ConnectionError("the Redis Cluster has no masters")

        def on_sharded(channel: bytes, message: bytes) -> None:
            if channel.startswith(ADMIN_SHARD_PREFIX_BYTES):
                channel = ADMIN_CHANNEL_BYTES  # the hub knows one admin channel
            handler(channel, message)

        opened: list[BusConnection] = []
        try:
            host, port = random.choice(primaries)
            classic = await BusConnection.open(node_url(url, host, port), handler, on_error, name)
            opened.append(classic)
            shards: dict[tuple[str, int], BusConnection] = {}
            for host, port in primaries:
                conn = await BusConnection.open(node_url(url, host, port), on_sharded, on_error, name, sharded=True)
                opened.append(conn)
                shards[(host, port)] = conn
        except BaseException:
            for conn in opened:
                conn.close()
            raise
        return cls(cluster, classic, shards)

    def _all(self) -> list[BusConnection]:
        return [self.classic, *self.shards.values()]

    def _component_closed(self, future: asyncio.Future[BaseException]) -> None:
        self.fail(future.result())

    def _owners(self, names: list[BusName]) -> dict[BusConnection, list[str]] | None:
        """Sharded channels grouped by the connection of their master; None if a master is unknown."""
        grouped: dict[BusConnection, list[str]] = {}
        for name in names:
            for channel in _sharded_channels(name):
                node = self._cluster.get_node_from_key(channel)
                conn = self.shards.get((node.host, int(node.port)))
                if conn is None:
                    return None
                grouped.setdefault(conn, []).append(channel)
        return grouped

    def subscribe(self, names: list[BusName]) -> None:
        self._send(names, subscribe=True)

    def unsubscribe(self, names: list[BusName]) -> None:
        self._send(names, subscribe=False)

    def _send(self, names: list[BusName], *, subscribe: bool) -> None:
        # Every name is also held on the classic connection: a routed message sent with a
        # plain PUBLISH on push:user:{…} or push:admin (SPEC §3, docs/BUS.md) still arrives.
        # The SDK only SPUBLISHes those, so nothing arrives twice from it.
        if names:
            (self.classic.subscribe if subscribe else self.classic.unsubscribe)(names)
        grouped = self._owners([name for name in names if is_sharded(name)])
        if grouped is None:  # the slot map changed under us: start over with a fresh one
            self.fail(ConnectionError("a sharded channel's master is not connected (slot map changed)"))
            return
        for conn, channels in grouped.items():
            (conn.subscribe if subscribe else conn.unsubscribe)(channels)

    def ping(self) -> asyncio.Future[bool]:
        """A barrier over every connection: True once all have answered everything sent before it."""
        result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        pings = [conn.ping() for conn in self._all()]
        remaining = len(pings)

        def answered(future: asyncio.Future[bool]) -> None:
            nonlocal remaining
            remaining -= 1
            if result.done():
                return
            if not future.result():
                result.set_result(False)
            elif remaining == 0:
                result.set_result(True)

        for ping in pings:
            ping.add_done_callback(answered)
        return result

    def stalled(self, since: float) -> bool:
        return any(conn.stalled(since) for conn in self._all())

    def fail(self, exc: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        for conn in self._all():
            conn.fail(exc)

    def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(ConnectionError("bus connections closed"))
        for conn in self._all():
            conn.close()


class ClusterBroker(RedisBroker):
    """A :class:`RedisBroker` whose bus is a Redis Cluster (``redis+cluster://`` URL)."""

    def _command_client(self, url: str) -> Any:
        return async_client(
            url,
            socket_connect_timeout=2,
            socket_keepalive=True,
            socket_timeout=REDIS_POOL_TIMEOUT_SECONDS,
        )

    async def _open(self, handler: MessageHandler) -> BusLink:
        return await ShardedBus.open(self.client, self.url, handler, self._handler_failed, self.connection_name)
