"""The event bus a node listens to: what it must do, on Redis and in memory.

:class:`RedisBroker` PSUBSCRIBEs ``events:*`` and SUBSCRIBEs ``spirit:events``
and survives Redis going away: it reconnects with capped exponential backoff and
full jitter, resubscribes, re-reads the history epoch and counts each recovery
in ``redis_reconnects_total``; client connections are never touched by it.
:class:`MemoryBroker` is the single-process fallback of ``pushctl up``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from abc import ABC, abstractmethod
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.history import EPOCH_KEY
from cluster.logs import log
from cluster.metrics import BUS_CONNECTED, REDIS_RECONNECTS

EVENTS_PATTERN = "events:*"
EVENTS_PREFIX = "events:"
LEGACY_CHANNEL = "spirit:events"
REDIS_POOL_SIZE = 32
REDIS_POOL_TIMEOUT_SECONDS = 5.0

MessageHandler = Callable[[bytes, bytes], None]
"""Called with (bus channel, message) for every message, synchronously."""

BUS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


class Broker(ABC):
    """A pub/sub bus carrying envelopes on ``events:<channel>`` and ``spirit:events``."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.epoch = ""  # changes when the bus loses its history (restart, flush)
        self.on_ready: Callable[[], Awaitable[None]] | None = None

    @abstractmethod
    async def run(self, handler: MessageHandler) -> None:
        """Deliver every bus message to ``handler`` until cancelled."""

    @abstractmethod
    async def publish(self, channel: str, message: bytes) -> int:
        """Publish one message; returns the number of bus subscribers that got it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class RedisBroker(Broker):
    def __init__(self, url: str, *, max_backoff: float = 5.0) -> None:
        super().__init__()
        self.url = url
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
        self.client = aioredis.Redis(connection_pool=pool)
        self._max_backoff = max_backoff

    async def publish(self, channel: str, message: bytes) -> int:
        return int(await self.client.publish(channel, message))

    async def load_epoch(self) -> str:
        """The bus's history epoch; a new one appears when Redis lost its data."""
        await self.client.set(EPOCH_KEY, secrets.token_hex(4), nx=True)
        value = await self.client.get(EPOCH_KEY)
        return value.decode() if value else ""

    async def run(self, handler: MessageHandler) -> None:
        backoff = 0.1
        lost = False
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(EVENTS_PATTERN)
                await pubsub.subscribe(LEGACY_CHANNEL)
                self.epoch = await self.load_epoch()
                if self.on_ready is not None:
                    await self.on_ready()
                self.ready.set()
                BUS_CONNECTED.set(1)
                if lost:
                    REDIS_RECONNECTS.inc()
                    log("redis_reconnected", url=_safe_url(self.url))
                    lost = False
                backoff = 0.1
                await self._pump(pubsub, handler)
            except BUS_ERRORS as exc:
                self.ready.clear()
                BUS_CONNECTED.set(0)
                if not lost:
                    log("redis_lost", logging.WARNING, url=_safe_url(self.url), reason=type(exc).__name__)
                lost = True
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, self._max_backoff)
            finally:
                await _quietly_close(pubsub)

    async def _pump(self, pubsub: aioredis.client.PubSub, handler: MessageHandler) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            handler(message["channel"], message["data"])

    async def close(self) -> None:
        await self.client.aclose()


async def _quietly_close(pubsub: aioredis.client.PubSub) -> None:
    try:
        await pubsub.aclose()
    except BUS_ERRORS:
        pass  # the connection is already gone; nothing to release


def _safe_url(url: str) -> str:
    """A Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


class MemoryBroker(Broker):
    """An in-process bus for a single node when no Redis is available."""

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
        if not (channel.startswith(EVENTS_PREFIX) or channel == LEGACY_CHANNEL):
            return 0
        for handler in self._handlers:
            handler(channel.encode(), message)
        return len(self._handlers)
