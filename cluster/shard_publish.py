"""Publishing one event on a Redis Cluster (the SDK's cluster path; SPEC §3, §8).

One Lua script may only touch one slot, so a publish is up to three steps,
each on the shard that owns it, in this order:

1. the history script on the channel's shard (``push:history:{<channel>}``),
   in one pipeline with ``WAIT <replicas> <ms>`` so that an acknowledged event
   is on a replica before anyone is told about it: a master SIGKILLed right
   after cannot take it away (when no replica confirms in time the event is
   still published, and counted in ``sdk_unreplicated_events_total``; that
   shard is then not waited on for 5 s, so a master left without replicas
   after a failover does not cost every publish the timeout);
2. a public or broadcast event: ``PUBLISH events:<channel>`` (classic pub/sub,
   which the cluster broadcasts to every shard), always through the same master
   (the owner of ``push:public``): messages sent from different masters reach a
   subscriber over different cluster-bus links, and one publisher's events on
   different channels would then arrive out of order;
3. a private event: ``SPUBLISH push:user:{<userId>}`` on the user's shard (one
   user's events keep their order), then ``SPUBLISH push:admin:{<n>}`` (the
   admin channels are spread over 16 slots, see
   :func:`cluster.bus_routing.admin_shard_channel`).

History comes first, so a client that misses the live message (its node was
re-subscribing after a failover) finds the event when it recovers. A step that
fails because its shard is failing over (connection refused, MOVED,
CLUSTERDOWN) is retried on the new owner, after re-reading the slot map, for up
to ``retry_seconds``; retrying a step whose reply was lost can store an event
twice, which recovery and both clients drop by event id.

The channel is added to its domain's set of channels with history (for
wildcard recovery) on its first publish and again every tenth of the
retention, not on every publish: that set lives in one slot.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.bus_routing import EVENTS_PREFIX, admin_shard_channel, routed_message, user_channel
from cluster.history import CLUSTER_PUBLISH_SCRIPT, EPOCH_KEY, channels_key, cluster_stream_key
from cluster.metrics import SDK_UNREPLICATED
from cluster.redis_url import async_client, parse_cluster_url
from cluster.state import state_key, state_set_key, with_seq

T = TypeVar("T")

RETRY_SECONDS = 30.0
WAIT_REPLICAS = 1
WAIT_TIMEOUT_MS = 200
UNREPLICATED_BACKOFF_SECONDS = 5.0
PUBLIC_ROUTE_KEY = "push:public"  # public events are PUBLISHed on the master owning this key's slot
REGISTER_FRACTION = 0.1  # re-add a channel to its domain's set this often (share of the retention)
SHARD_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError, RedisClusterException)
MOVING_REPLIES = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "READONLY", "MASTERDOWN")


class ShardedPublisher:
    """Writes history and publishes events on a Redis Cluster, shard by shard."""

    def __init__(
        self,
        url: str,
        *,
        wait_replicas: int = WAIT_REPLICAS,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._credentials = parse_cluster_url(url).client_options()
        self._cluster: RedisCluster = async_client(url)  # type: ignore[assignment]
        self._shards: dict[tuple[str, int], aioredis.Redis] = {}
        self._registered: dict[str, float] = {}  # channel -> monotonic time it was last added to its domain set
        self._unreplicated_until: dict[tuple[str, int], float] = {}  # shard -> when to WAIT for replicas again
        self._ready = False
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.retry_seconds = retry_seconds

    async def publish(
        self,
        channel: str,
        envelope: bytes,
        event_id: str,
        user_id: str | None,
        max_events: int,
        retention_seconds: int,
        state_seconds: int | None = None,
    ) -> int:
        """Store then publish one event; raises the last shard error once ``retry_seconds`` are spent.

        ``state_seconds`` marks a state channel (cluster/state.py): its latest value is kept that
        long and the envelope carries the channel's sequence number, which is returned (else 0).
        """
        retention_ms = retention_seconds * 1000
        if not self._ready:
            await self._retrying(self._prepare)
        await self._register(channels_key(channel), channel, retention_ms)
        stream = cluster_stream_key(channel)
        keys, args = [stream], [envelope, event_id, max_events, retention_ms]
        if state_seconds is not None:
            await self._register(state_set_key(channel.partition(":")[0]), channel, state_seconds * 1000)
            keys.append(state_key(channel, cluster=True))
            args.append(state_seconds * 1000)
        seq = await self._retrying(lambda: self._store(keys, args))
        message = envelope if state_seconds is None else with_seq(seq, envelope)
        if user_id is None:
            bus = EVENTS_PREFIX + channel
            await self._retrying(lambda: self._on_owner(PUBLIC_ROUTE_KEY, lambda shard: shard.publish(bus, message)))
            return seq
        routed = routed_message(channel, message)
        for bus_channel in (user_channel(user_id), admin_shard_channel(user_id)):
            await self._retrying(lambda c=bus_channel: self._on_owner(c, lambda shard: shard.spublish(c, routed)))
        return seq

    async def close(self) -> None:
        for shard in self._shards.values():
            await shard.aclose()
        await self._cluster.aclose()

    # --- steps --------------------------------------------------------------------------

    async def _prepare(self) -> None:
        await self._cluster.initialize()
        await self._cluster.set(EPOCH_KEY, secrets.token_hex(4), nx=True)
        self._ready = True

    async def _register(self, key: str, channel: str, retention_ms: int) -> None:
        """Add ``channel`` to the set ``key`` (channels with history, or a type's state channels), now and then."""
        now = time.monotonic()
        last = self._registered.get(key + " " + channel)
        if last is not None and now - last < retention_ms / 1000 * REGISTER_FRACTION:
            return

        async def add() -> None:
            await self._cluster.sadd(key, channel)
            await self._cluster.pexpire(key, retention_ms)

        await self._retrying(add)
        if len(self._registered) > 100_000:
            self._registered.clear()
        self._registered[key + " " + channel] = now

    async def _store(self, keys: list[str], args: list[Any]) -> int:
        """The history script (and the state hash) on the channel's shard, then WAIT; returns the state seq."""

        async def run(shard: aioredis.Redis) -> int:
            address = _address(shard)
            wait = self.wait_replicas > 0 and self._unreplicated_until.get(address, 0.0) <= time.monotonic()
            pipe = shard.pipeline(transaction=False)
            script = shard.register_script(CLUSTER_PUBLISH_SCRIPT)
            await script(keys=keys, args=args, client=pipe)
            if wait:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            replies = await pipe.execute()
            if not wait or int(replies[-1]) < self.wait_replicas:
                SDK_UNREPLICATED.inc()
                if wait:  # no replica now (one just took over): do not pay the timeout on every publish
                    self._unreplicated_until[address] = time.monotonic() + UNREPLICATED_BACKOFF_SECONDS
            return int(replies[0])

        return await self._on_owner(keys[0], run)

    async def _on_owner(self, key: str, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``operation`` on a plain client of the master owning ``key``'s slot (one connection: WAIT works)."""
        node = self._cluster.get_node_from_key(key)
        address = (node.host, int(node.port))
        shard = self._shards.get(address)
        if shard is None:
            shard = aioredis.Redis(
                host=address[0], port=address[1], socket_connect_timeout=2, socket_timeout=5, **self._credentials
            )
            self._shards[address] = shard
        return await operation(shard)

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step``; while its shard fails over, re-read the slot map and try again (bounded)."""
        deadline = time.monotonic() + self.retry_seconds
        backoff = 0.05
        while True:
            try:
                return await step()
            except ResponseError as exc:
                if not str(exc).startswith(MOVING_REPLIES) or time.monotonic() > deadline:
                    raise
            except SHARD_ERRORS:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 1.0)
            try:
                await self._cluster.nodes_manager.initialize()
            except (*SHARD_ERRORS, ResponseError):
                continue  # the next attempt asks again


def _address(shard: aioredis.Redis) -> tuple[str, int]:
    kwargs = shard.connection_pool.connection_kwargs
    return (str(kwargs.get("host")), int(kwargs.get("port", 0)))
