"""Cluster membership (SPEC §7): which push nodes are alive, in Redis or in memory.

Each node heartbeats a record of itself (id, public WebSocket URL, internal URL,
connection count, start time) every ``heartbeat_seconds``. In Redis that is a
sorted set ``push:nodes`` scored by lease expiry plus a hash ``push:node:<id>``
(on a Redis Cluster ``push:node:{push:nodes}:<id>``, hash-tagged into the sorted
set's slot so that the scripts work there) with the same PEXPIRE, written by one
Lua script that reads Redis's own clock
(node clocks never matter). Joins and leaves are announced on the pub/sub
channel ``push:membership``.

Everyone who needs the live list (routers, and nodes for rebalancing) keeps a
view: an announcement triggers a full read at once, and a full read also runs
every ``heartbeat_seconds`` whatever happens, so the view converges in
milliseconds and can never drift. A full read removes (and announces) nodes
whose lease ran out, so a crashed node leaves within ``node_ttl_seconds`` plus
one period; a stopping node withdraws itself at once. While Redis is
unreachable the view keeps the last list it read (routing keeps working) and
says it is not connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Callable

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from cluster.backoff import Backoff, Reconnection, keep_connected
from cluster.broker import BUS_ERRORS
from cluster.clock import now_ms
from cluster.logs import log
from cluster.redis_url import AsyncClient, async_client
from cluster.ring import Ring

NODES_KEY = "push:nodes"
NODE_KEY_PREFIX = "push:node:"
CLUSTER_NODE_KEY_PREFIX = "push:node:{push:nodes}:"  # on a Redis Cluster: hash-tagged into the sorted set's slot
MEMBERSHIP_CHANNEL = "push:membership"

MEMBERSHIP_ERRORS = (*BUS_ERRORS, RedisError, RedisClusterException)
"""What a membership call may raise when Redis is gone, restarting, read-only or confused."""

RingListener = Callable[[Ring, Ring], None]
"""Called synchronously with (old ring, new ring) whenever the set of live nodes changes."""

# KEYS: nodes zset, node hash. ARGV: id, ttl ms, info JSON, announce ("1": always), channel.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local added = redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], 'info', ARGV[3], 'updated', now)
redis.call('PEXPIRE', KEYS[2], ttl)
if added == 1 or ARGV[4] == '1' then
  redis.call('PUBLISH', ARGV[5], cjson.encode({event = 'join', node = ARGV[1]}))
end
return now
"""

# KEYS: nodes zset. ARGV: node key prefix, channel. Returns {now, id, info, updated, ...}.
READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', ARGV[1] .. id)
  redis.call('PUBLISH', ARGV[2], cjson.encode({event = 'leave', node = id, reason = 'expired'}))
end
local out = {now}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local fields = redis.call('HMGET', ARGV[1] .. id, 'info', 'updated')
  if fields[1] then
    table.insert(out, id)
    table.insert(out, fields[1])
    table.insert(out, fields[2])
  end
end
return out
"""

# KEYS: nodes zset, node hash. ARGV: id, channel.
LEAVE = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[2], cjson.encode({event = 'leave', node = ARGV[1], reason = 'stopping'}))
return removed
"""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the cluster knows about one live node."""

    id: str
    url: str  # public WebSocket URL: what /v1/route hands to clients
    internal_url: str  # HTTP base URL the router proxies to
    connections: int = 0
    started_at: int = 0  # ms, node clock
    updated_at: int = 0  # ms, Redis clock: last heartbeat
    verifier: str = ""  # TokenVerifier.fingerprint: which tokens it accepts ("" from nodes that predate it)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "url": self.url,
                "internalUrl": self.internal_url,
                "connections": self.connections,
                "startedAt": self.started_at,
                "verifier": self.verifier,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str, updated_at: int) -> NodeInfo:
        doc = orjson.loads(data)
        return cls(
            id=str(doc["id"]),
            url=str(doc["url"]),
            internal_url=str(doc["internalUrl"]),
            connections=int(doc.get("connections", 0)),
            started_at=int(doc.get("startedAt", 0)),
            updated_at=updated_at,
            verifier=str(doc.get("verifier", "")),
        )


class Membership(ABC):
    """The live node list: nodes announce and withdraw themselves, everyone watches it."""

    def __init__(self, heartbeat_seconds: float, ttl_seconds: float) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.ttl_ms = int(ttl_seconds * 1000)
        self.nodes: dict[str, NodeInfo] = {}
        self.ring = Ring()
        self.now_ms = 0  # membership clock at the last read (Redis time in Redis)
        self.connected = False
        self.loaded = asyncio.Event()  # set after the first successful read
        self._listeners: list[RingListener] = []
        # After Redis comes back (possibly empty) the nodes of the last view are kept for one
        # lease, unless they announce that they leave: live nodes re-register within a heartbeat,
        # and routing must not flap to "no node" in between.
        self._grace: dict[str, NodeInfo] = {}
        self._grace_until = 0.0

    def on_ring_change(self, listener: RingListener) -> None:
        self._listeners.append(listener)

    def _apply(self, nodes: dict[str, NodeInfo], now_ms: int) -> None:
        """Install a freshly read list; rebuild the ring only when the set of ids changed."""
        if self._grace:
            if time.monotonic() < self._grace_until:
                for node_id, info in self._grace.items():
                    nodes.setdefault(node_id, info)
            else:
                self._grace = {}
        self.nodes = nodes
        self.now_ms = now_ms
        self.connected = True
        self.loaded.set()
        if nodes.keys() == self.ring.node_ids:
            return
        old, new = self.ring, Ring(nodes)
        self.ring = new
        log(
            "membership_changed",
            nodes=sorted(new.node_ids),
            joined=sorted(new.node_ids - old.node_ids) or None,
            left=sorted(old.node_ids - new.node_ids) or None,
        )
        for listener in self._listeners:
            listener(old, new)

    @abstractmethod
    async def announce(self, info: NodeInfo, *, join: bool = False) -> None:
        """Register or refresh ``info`` (a heartbeat); ``join`` always announces it."""

    @abstractmethod
    async def withdraw(self, node_id: str) -> None:
        """Take a node out of the ring at once (it is stopping)."""

    @abstractmethod
    async def refresh(self) -> None:
        """Read the whole live list now and install it."""

    @abstractmethod
    async def watch(self) -> None:
        """Keep the view current until cancelled."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the membership store is reachable now."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class RedisMembership(Membership):
    def __init__(
        self,
        client: AsyncClient,
        heartbeat_seconds: float,
        ttl_seconds: float,
        *,
        max_backoff: float = 2.0,
    ) -> None:
        super().__init__(heartbeat_seconds, ttl_seconds)
        self.client = client
        self.node_key_prefix = CLUSTER_NODE_KEY_PREFIX if isinstance(client, RedisCluster) else NODE_KEY_PREFIX
        self._heartbeat = client.register_script(HEARTBEAT)
        self._read = client.register_script(READ)
        self._leave = client.register_script(LEAVE)
        self._max_backoff = max_backoff

    @classmethod
    def from_url(cls, url: str, heartbeat_seconds: float, ttl_seconds: float) -> RedisMembership:
        client = async_client(url, socket_connect_timeout=2, socket_timeout=5, socket_keepalive=True)
        return cls(client, heartbeat_seconds, ttl_seconds)

    async def announce(self, info: NodeInfo, *, join: bool = False) -> None:
        await self._heartbeat(
            keys=[NODES_KEY, self.node_key_prefix + info.id],
            args=[info.id, self.ttl_ms, info.to_json(), "1" if join else "0", MEMBERSHIP_CHANNEL],
        )

    async def withdraw(self, node_id: str) -> None:
        await self._leave(keys=[NODES_KEY, self.node_key_prefix + node_id], args=[node_id, MEMBERSHIP_CHANNEL])

    async def refresh(self) -> None:
        reply: list[Any] = await self._read(keys=[NODES_KEY], args=[self.node_key_prefix, MEMBERSHIP_CHANNEL])
        now_ms = int(reply[0])
        nodes: dict[str, NodeInfo] = {}
        for i in range(1, len(reply) - 2, 3):
            try:
                info = NodeInfo.from_json(reply[i + 1], int(reply[i + 2]))
            except (ValueError, KeyError, TypeError):
                log("membership_bad_record", logging.WARNING, node=_text(reply[i]))
                continue
            nodes[info.id] = info
        self._apply(nodes, now_ms)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), 1.0))
        except (TimeoutError, *MEMBERSHIP_ERRORS):
            return False

    async def watch(self) -> None:
        await keep_connected(self._session, MEMBERSHIP_ERRORS, self._lost, Backoff(0.1, self._max_backoff))

    async def _session(self, reconnection: Reconnection) -> None:
        """Subscribe to announcements, read the live list, then follow it until lost."""
        pubsub = None
        try:
            if isinstance(self.client, RedisCluster):  # its pub/sub needs the slot map, as it is now
                await self.client.initialize()
                if reconnection.lost:
                    await self.client.nodes_manager.initialize()
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(MEMBERSHIP_CHANNEL)
            if reconnection.lost:
                self._grace = dict(self.nodes)
                self._grace_until = time.monotonic() + self.ttl_ms / 1000
            await self.refresh()  # after subscribing: no announcement can fall in between
            checkpoint()
            if reconnection.connected():
                log("membership_reconnected", kept=len(self._grace) or None)
            await self._follow(pubsub)
        finally:
            try:
                if pubsub is not None:
                    await pubsub.aclose()
            except MEMBERSHIP_ERRORS:
                pass  # the connection is already gone

    def _lost(self, exc: BaseException, first: bool) -> None:
        self.connected = False
        if first:
            log("membership_lost", logging.WARNING, reason=type(exc).__name__)

    async def _follow(self, pubsub: aioredis.client.PubSub) -> None:
        """Re-read on every announcement, and at least once per heartbeat period.

        No timed waits here: on Python 3.11 ``asyncio.timeout``/``wait_for`` can
        swallow a cancellation that lands with the timeout, which would keep a
        stopping process alive. The subscription is read by its own task with a
        blocking read and a timer pokes the same event.
        """
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        listener = loop.create_task(_listen(pubsub, wake, self._grace))
        listener.add_done_callback(lambda _: wake.set())
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal timer
            wake.set()
            timer = loop.call_later(self.heartbeat_seconds, tick)

        timer = loop.call_later(self.heartbeat_seconds, tick)
        try:
            while True:
                await wake.wait()
                wake.clear()  # several announcements in a row (a rolling restart) need one read
                if listener.done():
                    listener.result()  # the subscription failed: raise its bus error
                    raise ConnectionError("membership subscription ended")
                await self.refresh()
                checkpoint()
        finally:
            timer.cancel()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def close(self) -> None:
        await self.client.aclose()


class MemoryMembership(Membership):
    """Membership inside one process (``pushctl up`` without Redis): a node and a router share it."""

    def __init__(self, heartbeat_seconds: float, ttl_seconds: float) -> None:
        super().__init__(heartbeat_seconds, ttl_seconds)
        self._records: dict[str, tuple[NodeInfo, int]] = {}  # id -> (info, lease expiry ms)

    async def announce(self, info: NodeInfo, *, join: bool = False) -> None:
        now = now_ms()
        fresh = info.id not in self._records
        self._records[info.id] = (replace(info, updated_at=now), now + self.ttl_ms)
        if fresh or join:
            await self.refresh()

    async def withdraw(self, node_id: str) -> None:
        if self._records.pop(node_id, None) is not None:
            await self.refresh()

    async def refresh(self) -> None:
        now = now_ms()
        for node_id in [n for n, (_, expiry) in self._records.items() if expiry <= now]:
            del self._records[node_id]
        self._apply({n: info for n, (info, _) in self._records.items()}, now)

    async def ping(self) -> bool:
        return True

    async def watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.heartbeat_seconds)


def checkpoint() -> None:
    """Raise the cancellation a redis-py call may have swallowed.

    On Python 3.11 ``asyncio.wait_for`` (which redis-py uses around socket
    writes) returns normally when the task is cancelled just as the write
    completes (CPython gh-86296, fixed in 3.12); a loop of Redis calls would
    then never stop. Call this after Redis calls in long-running loops.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _listen(pubsub: aioredis.client.PubSub, announced: asyncio.Event, grace: dict[str, NodeInfo]) -> None:
    """Wake the reader on every announcement; a node that says it leaves loses its grace."""
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is None:
            continue
        if grace:
            try:
                doc = orjson.loads(message["data"])
            except (orjson.JSONDecodeError, TypeError):
                doc = {}
            if isinstance(doc, dict) and doc.get("event") == "leave":
                grace.pop(str(doc.get("node")), None)
        announced.set()


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
