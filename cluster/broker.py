"""The event bus a node listens to: what it must do, on Redis and in memory.

A node tells its broker which bus names it needs (:meth:`Broker.want` /
:meth:`Broker.unwant`, reference-counted with a linger, see
:mod:`cluster.bus_interest`); :class:`RedisBroker` keeps exactly those
subscribed on one pub/sub connection read in bulk (:mod:`cluster.bus_reader`),
batching the (P)SUBSCRIBE commands of one loop iteration into one write, and
:meth:`Broker.settled` waits until Redis has confirmed them, so a subscribe can
be acknowledged only once its events are on their way. The broker survives
Redis going away: it reconnects with capped exponential backoff and full
jitter, resubscribes everything wanted, re-reads the history epoch and counts
each recovery in ``redis_reconnects_total``; client connections are never
touched by it. :class:`MemoryBroker` is the single-process fallback of
``pushctl up``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from abc import ABC, abstractmethod
from typing import Any, Awaitable, Callable, Iterable

import redis.asyncio as aioredis
from redis.exceptions import ClusterError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.backoff import Backoff, Reconnection, keep_connected
from cluster.bus_hold import HoldUntilReady
from cluster.bus_interest import InterestCounts
from cluster.bus_reader import BusConnection, BusLink, BusRefused, MessageHandler
from cluster.bus_routing import ADMIN_CHANNEL, EVENTS_PREFIX, LEGACY_CHANNEL, USER_PREFIX, BusName
from cluster.history import EPOCH_KEY
from cluster.logs import RateLimitedLog, log
from cluster.metrics import BUS_CONNECTED, BUS_SUBSCRIPTIONS, REDIS_RECONNECTS

__all__ = ["BUS_ERRORS", "Broker", "MemoryBroker", "MessageHandler", "RedisBroker"]

REDIS_POOL_SIZE = 32
REDIS_POOL_TIMEOUT_SECONDS = 5.0
SUBSCRIBE_TIMEOUT_SECONDS = 5.0  # Redis must confirm the resubscription of a new connection within this
SWEEP_SECONDS = 0.25  # how often lingering names are checked
HEALTH_SECONDS = 5.0  # a PING on an idle bus connection this often; no answer within as long: reconnect

BUS_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
    ClusterError,  # a Redis Cluster failing over: CLUSTERDOWN, TRYAGAIN, MASTERDOWN
    RedisClusterException,  # a Redis Cluster whose slot map cannot be read now
)


class Broker(ABC):
    """A pub/sub bus carrying events (SPEC §3 bus routing) to the node, for the names it wants."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.epoch = ""  # changes when the bus loses its history (restart, flush)
        self.on_ready: Callable[[], Awaitable[None]] | None = None

    @abstractmethod
    async def run(self, handler: MessageHandler) -> None:
        """Deliver every bus message of the wanted names to ``handler`` until cancelled."""

    @abstractmethod
    async def publish(self, channel: str, message: bytes) -> int:
        """Publish one message; returns the number of bus subscribers that got it."""

    def want(self, names: Iterable[BusName]) -> None:  # noqa: B027 - a bus without routing takes everything
        """One more holder of each bus name (a channel or a glob)."""

    def unwant(self, names: Iterable[BusName]) -> None:  # noqa: B027
        """One holder less of each bus name."""

    async def settled(self, names: Iterable[BusName], timeout: float) -> bool:
        """Wait (at most ``timeout``) until the bus delivers every name; False if it cannot now."""
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class RedisBroker(Broker):
    def __init__(self, url: str, *, max_backoff: float = 5.0, linger_seconds: float = 2.0, name: str = "") -> None:
        super().__init__()
        self.url = url
        self.client = self._command_client(url)
        self.connection_name = re.sub(r"[^A-Za-z0-9_.:-]", "_", f"push-bus:{name}")[:100] if name else ""
        self._max_backoff = max_backoff
        self.interest = InterestCounts(linger_seconds)
        self.interest.acquire([LEGACY_CHANNEL])  # the legacy channel is always read
        self._conn: BusLink | None = None
        self._to_subscribe: set[BusName] = set()
        self._to_unsubscribe: set[BusName] = set()
        self._flush_scheduled = False
        self._pending: dict[BusName, asyncio.Future[bool]] = {}  # sent, not yet confirmed
        self._log_handler_error = RateLimitedLog(per_second=1)
        self._log_refused = RateLimitedLog(per_second=0.2, burst=3)

    def _command_client(self, url: str) -> Any:
        """The client for commands and scripts (history, caps, membership)."""
        # Bounded: a reconnect storm's connection-cap checks queue for a connection
        # instead of opening one per connecting client.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_POOL_SIZE,
            timeout=REDIS_POOL_TIMEOUT_SECONDS,
            socket_connect_timeout=2,
            socket_keepalive=True,
            health_check_interval=10,
        )
        return aioredis.Redis(connection_pool=pool)

    async def _open(self, handler: MessageHandler) -> BusLink:
        """The subscriber connection (a Redis Cluster opens several, used as one)."""
        return await BusConnection.open(self.url, handler, self._handler_failed, self.connection_name)

    async def publish(self, channel: str, message: bytes) -> int:
        return int(await self.client.publish(channel, message))

    async def load_epoch(self) -> str:
        """The bus's history epoch; a new one appears when Redis lost its data."""
        await self.client.set(EPOCH_KEY, secrets.token_hex(4), nx=True)
        value = await self.client.get(EPOCH_KEY)
        return value.decode() if value else ""

    # --- interest ---------------------------------------------------------------------

    def want(self, names: Iterable[BusName]) -> None:
        new = self.interest.acquire(names)
        for name in new:
            if name in self._to_unsubscribe:
                self._to_unsubscribe.discard(name)  # never left Redis
            else:
                self._to_subscribe.add(name)
        if new:
            self._schedule_flush()

    def unwant(self, names: Iterable[BusName]) -> None:
        self.interest.release(names, asyncio.get_running_loop().time())

    async def settled(self, names: Iterable[BusName], timeout: float) -> bool:
        self._flush()
        if self._conn is None:
            return False
        waiting = {future for name in names if (future := self._pending.get(name)) is not None}
        if not waiting:
            return True
        done, _ = await asyncio.wait(waiting, timeout=timeout)
        return len(done) == len(waiting) and all(future.result() for future in done)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what this loop iteration asked for: one write, one barrier."""
        self._flush_scheduled = False
        subscribe, unsubscribe = sorted(self._to_subscribe), sorted(self._to_unsubscribe)
        self._to_subscribe.clear()
        self._to_unsubscribe.clear()
        conn = self._conn
        if conn is None or not (subscribe or unsubscribe):
            return  # while disconnected the next connection subscribes to everything wanted
        conn.unsubscribe(unsubscribe)
        conn.subscribe(subscribe)
        BUS_SUBSCRIPTIONS.set(len(self.interest.subscribed))
        if subscribe:
            self._await_confirmation(conn.ping(), subscribe)

    def _await_confirmation(self, barrier: asyncio.Future[bool], names: list[BusName]) -> None:
        pending = self._pending
        for name in names:
            pending[name] = barrier

        def confirmed(future: asyncio.Future[bool]) -> None:
            for name in names:
                if pending.get(name) is future:
                    del pending[name]

        barrier.add_done_callback(confirmed)

    def _sweep(self) -> None:
        expired = self.interest.expired(asyncio.get_running_loop().time())
        if expired:
            for name in expired:
                if name in self._to_subscribe:
                    self._to_subscribe.discard(name)  # never sent
                else:
                    self._to_unsubscribe.add(name)
            self._flush()

    # --- the connection ---------------------------------------------------------------

    async def run(self, handler: MessageHandler) -> None:
        await keep_connected(
            lambda reconnection: self._session(handler, reconnection),
            BUS_ERRORS,
            self._lost,
            Backoff(0.1, self._max_backoff),
        )

    async def _session(self, handler: MessageHandler, reconnection: Reconnection) -> None:
        """Connect, subscribe everything wanted, wait for Redis to confirm, then watch until lost."""
        conn: BusLink | None = None
        held = HoldUntilReady(handler, self._handler_failed)  # until on_ready has caught clients up
        try:
            conn = await self._open(held)
            self._to_subscribe.clear()
            self._to_unsubscribe.clear()
            self._pending.clear()
            self._conn = conn
            names = self.interest.reset()
            conn.subscribe(names)
            barrier = conn.ping()
            self._await_confirmation(barrier, names)
            BUS_SUBSCRIPTIONS.set(len(names))
            if not await asyncio.wait_for(barrier, SUBSCRIBE_TIMEOUT_SECONDS):
                raise conn.closed.result() if conn.closed.done() else ConnectionError("subscribe failed")
            self.epoch = await self.load_epoch()
            if self.on_ready is not None:
                await self.on_ready()
            await held.release()
            self.ready.set()
            BUS_CONNECTED.set(1)
            if reconnection.connected():
                REDIS_RECONNECTS.inc()
                log("redis_reconnected", url=_safe_url(self.url))
            await self._watch(conn)
        finally:
            self._conn = None
            if conn is not None:
                conn.close()

    def _lost(self, exc: BaseException, first: bool) -> None:
        self.ready.clear()
        BUS_CONNECTED.set(0)
        if isinstance(exc, BusRefused):  # a misconfiguration (ACL, password): said on every retry, bounded
            self._log_refused("bus_refused", logging.ERROR, url=_safe_url(self.url), detail=str(exc)[:200])
        elif first:
            log("redis_lost", logging.WARNING, url=_safe_url(self.url), reason=type(exc).__name__, detail=str(exc)[:200])

    async def _watch(self, conn: BusLink) -> None:
        """Sweep lingering names and check the connection's health until it is lost; raises why."""
        loop = asyncio.get_running_loop()
        health: asyncio.Future[bool] | None = None
        checked = loop.time()
        while True:
            await asyncio.wait((conn.closed,), timeout=SWEEP_SECONDS)
            if conn.closed.done():
                raise conn.closed.result()
            self._sweep()
            now = loop.time()
            if health is not None and health.done():
                health, checked = None, now
            elif (
                health is not None
                and now - checked > HEALTH_SECONDS
                and conn.stalled(time.monotonic() - HEALTH_SECONDS)
            ):
                # No answer and nothing else read either: dead. A bus that is only behind (the
                # PONG queued after seconds of messages) is still reading and is left alone.
                conn.fail(TimeoutError("Redis did not answer the bus health check"))
            elif health is None and now - checked >= HEALTH_SECONDS:
                health, checked = conn.ping(), now

    def _handler_failed(self, exc: BaseException) -> None:
        self._log_handler_error("bus_handler_failed", logging.ERROR, reason=type(exc).__name__, detail=str(exc)[:200])

    async def close(self) -> None:
        await self.client.aclose()


def _safe_url(url: str) -> str:
    """A Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


ROUTED_PREFIXES = (EVENTS_PREFIX, USER_PREFIX)


class MemoryBroker(Broker):
    """An in-process bus for a single node when no Redis is available: every message reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = secrets.token_hex(4)
        self._handlers: list[MessageHandler] = []

    async def run(self, handler: MessageHandler) -> None:
        self._handlers.append(handler)
        if self.on_ready is not None:
            await self.on_ready()
        self.ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            self._handlers.remove(handler)

    async def publish(self, channel: str, message: bytes) -> int:
        if not (channel.startswith(ROUTED_PREFIXES) or channel in (LEGACY_CHANNEL, ADMIN_CHANNEL)):
            return 0
        for handler in self._handlers:
            handler(channel.encode(), message)
        return len(self._handlers)
