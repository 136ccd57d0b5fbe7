"""Cluster-wide per-user connection caps (SPEC §6): leases in Redis.

Each user has a sorted set ``push:conns:<user>`` of connection ids scored by
lease expiry (Redis server time, so node clocks do not matter). Acquiring is one
Lua script — drop expired leases, count, add if under the cap — so concurrent
connects on any nodes are counted exactly. A live node renews its leases every
third of the lease time; a node that dies stops renewing and its slots expire
within the lease (30 s by default). Every disconnect path releases its slot.

On a Redis Cluster each user's key is its own slot: acquisitions run as one
script call each (concurrently, as scripts cannot be pipelined there) and
renewals as one single-key script call per lease.

If Redis is unreachable at connect time the cap fails open (the connection is
accepted and counted locally) and the next renewal registers it in Redis.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from redis.asyncio.cluster import RedisCluster

from cluster.broker import BUS_ERRORS
from cluster.logs import log
from cluster.redis_url import AsyncClient

SLOTS_PREFIX = "push:conns:"

ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
"""

RENEW_BATCH = 500
FLUSH_BATCH = 500


class ConnectionSlots:
    """Counts a user's connections across the cluster (or locally, without Redis)."""

    def __init__(self, client: AsyncClient | None, max_per_user: int, lease_seconds: float) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self.max_per_user = max_per_user
        self.lease_ms = int(lease_seconds * 1000)
        self._local: dict[str, set[str]] = {}  # user -> connection ids held on this node
        self._acquire = client.register_script(ACQUIRE) if client is not None else None
        self._acquiring: list[tuple[str, str, asyncio.Future[bool]]] = []  # bounded by connects in flight
        self._releasing: list[tuple[str, str]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._renew = client.register_script(RENEW) if client is not None else None

    @property
    def renew_interval(self) -> float:
        return self.lease_ms / 3000

    async def acquire(self, user_id: str, connection_id: str) -> bool:
        """Take one of the user's slots; False if the user is at the cap."""
        if self._client is None:
            granted = self._locally_free(user_id)
        else:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._acquiring.append((user_id, connection_id, future))
            self._schedule_flush()
            granted = await future
        if granted:
            self._local.setdefault(user_id, set()).add(connection_id)
        return granted

    async def release(self, user_id: str, connection_id: str) -> None:
        held = self._local.get(user_id)
        if held is not None:
            held.discard(connection_id)
            if not held:
                del self._local[user_id]
        if self._client is not None:
            self._releasing.append((user_id, connection_id))
            self._schedule_flush()

    def _locally_free(self, user_id: str) -> bool:
        return len(self._local.get(user_id, ())) < self.max_per_user

    def _schedule_flush(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send waiting acquisitions and releases in pipelines: one round trip for many connects.

        In a reconnect storm thousands of clients connect at once; a script call each
        would cost a round trip and a pool connection apiece.
        """
        assert self._client is not None and self._acquire is not None
        acquiring: list[tuple[str, str, asyncio.Future[bool]]] = []
        try:
            while self._acquiring or self._releasing:
                acquiring, self._acquiring = self._acquiring[:FLUSH_BATCH], self._acquiring[FLUSH_BATCH:]
                releasing, self._releasing = self._releasing[:FLUSH_BATCH], self._releasing[FLUSH_BATCH:]
                try:
                    results = await self._send(acquiring, releasing)
                except BUS_ERRORS as exc:
                    # Fail open (count locally); a release that fails expires with its lease.
                    log("connection_cap_unavailable", logging.WARNING, reason=type(exc).__name__)
                    results = [None] * len(acquiring)
                for (user_id, _, future), result in zip(acquiring, results, strict=False):
                    if not future.done():
                        granted = bool(result) if isinstance(result, int) else self._locally_free(user_id)
                        future.set_result(granted)
        finally:
            self._flusher = None
            for user_id, _, future in acquiring + self._acquiring:  # cancelled mid-flush: nobody waits forever
                if not future.done():
                    future.set_result(self._locally_free(user_id))

    async def _send(
        self, acquiring: list[tuple[str, str, asyncio.Future[bool]]], releasing: list[tuple[str, str]]
    ) -> list[object]:
        """One batch of acquisitions (their results, in order) and releases."""
        assert self._client is not None and self._acquire is not None
        if self._cluster:
            calls = [
                self._acquire(keys=[SLOTS_PREFIX + user_id], args=[connection_id, self.max_per_user, self.lease_ms])
                for user_id, connection_id, _ in acquiring
            ]
            calls.extend(
                self._client.zrem(SLOTS_PREFIX + user_id, connection_id) for user_id, connection_id in releasing
            )
            results = await asyncio.gather(*calls, return_exceptions=True)
            if results and all(isinstance(result, BUS_ERRORS) for result in results):
                raise next(result for result in results if isinstance(result, BaseException))
            return list(results)
        pipe = self._client.pipeline(transaction=False)
        for user_id, connection_id, _ in acquiring:
            args = [connection_id, self.max_per_user, self.lease_ms]
            await self._acquire(keys=[SLOTS_PREFIX + user_id], args=args, client=pipe)
        for user_id, connection_id in releasing:
            pipe.zrem(SLOTS_PREFIX + user_id, connection_id)
        return list(await pipe.execute(raise_on_error=False))

    async def renew_all(self) -> int:
        """Extend every lease this node holds (and re-register them after a Redis loss)."""
        if self._renew is None:
            return 0
        pairs = [(user, conn) for user, conns in self._local.items() for conn in conns]
        if self._cluster:  # one slot per user: one single-key call per lease, a batch at a time
            for batch in _batches(pairs, RENEW_BATCH):
                await asyncio.gather(*(self._renew(keys=[SLOTS_PREFIX + u], args=[self.lease_ms, c]) for u, c in batch))
            return len(pairs)
        for batch in _batches(pairs, RENEW_BATCH):
            await self._renew(keys=[SLOTS_PREFIX + u for u, _ in batch], args=[self.lease_ms, *(c for _, c in batch)])
        return len(pairs)


def _batches(items: list[tuple[str, str]], size: int) -> Iterable[list[tuple[str, str]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
