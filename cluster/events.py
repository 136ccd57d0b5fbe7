"""The publisher SDK: how platform services publish events (SPEC §2–§3).

    publisher = EventPublisher("redis://127.0.0.1:6379/0", source="order-executor")
    await publisher.publish("order.filled", {"orderId": "o1"}, user_id="u1", priority="p1")

:class:`SyncEventPublisher` is the same for synchronous code. Both refuse unknown
event types and services unless ``allow_unknown=True``, build a complete
envelope, append it to the channel's bounded history and publish it in one
Lua script (see :mod:`cluster.history`): a public or broadcast event on
``events:<type>[:<key>]``, a private one (``user_id``) on its user's channel
``push:user:{<userId>}`` and on ``push:admin`` (SPEC §3 bus routing, wire
format in docs/BUS.md), so that it reaches only the nodes holding that user.
Any other language can publish live-only with a plain ``PUBLISH`` of a JSON
envelope, or routed and with history by running the same script.

Given a Redis Cluster URL (``redis+cluster://host:port[,host:port]``) both
publish through :class:`cluster.shard_publish.ShardedPublisher` instead: history
on the channel's shard (confirmed by a replica), then the user's sharded channel.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from cluster.channels import parse_channel
from cluster.envelope import KNOWN_SERVICES, build_envelope
from cluster.history import PUBLISH_SCRIPT, publish_args, publish_keys
from cluster.metrics import EVENTS_PUBLISHED
from cluster.redis_url import is_cluster_url
from cluster.settings import Settings
from cluster.shard_publish import ShardedPublisher

_DEFAULTS = Settings()

DEFAULT_SOURCE_BY_DOMAIN = {
    "order": "order-executor",
    "risk": "risk-manager",
    "ai": "nlp-processor",
    "strategy": "strategy-service",
    "backtest": "backtest-engine",
    "market": "market-data-collector",
    "spirit": "signal-analyzer",
}


def channel_for(event_type: str, key: str | None) -> str:
    """The event's channel name, validated (``<type>`` or ``<type>:<key>``)."""
    name = event_type if key is None else f"{event_type}:{key}"
    parse_channel(name)
    return name


def prepare(
    event_type: str,
    payload: Any,
    *,
    source: str,
    key: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    priority: str | None = None,
    ttl: int | None = None,
    correlation_id: str | None = None,
    allow_unknown: bool = False,
) -> tuple[str, dict[str, Any], bytes]:
    """(channel, envelope, encoded envelope) for one event."""
    envelope = build_envelope(
        event_type,
        payload,
        source=source,
        user_id=user_id,
        session_id=session_id,
        priority=priority,
        ttl=ttl,
        correlation_id=correlation_id,
        allow_unknown=allow_unknown,
    )
    return channel_for(event_type, key), envelope, orjson.dumps(envelope)


class _PublisherBase:
    """What both publishers share; subclasses only choose the Redis client (sync or asyncio)."""

    client_class: Any = None

    def __init__(
        self,
        redis_url: str,
        source: str,
        *,
        allow_unknown: bool = False,
        history_size: int | None = None,
        history_seconds: int | None = None,
        state_types: tuple[str, ...] | None = None,
    ) -> None:
        if not allow_unknown and source not in KNOWN_SERVICES:
            raise ValueError(f"unknown service {source!r} (pass allow_unknown=True to publish as it anyway)")
        self.source = source
        self.allow_unknown = allow_unknown
        self.history_size = history_size or _DEFAULTS.history_size
        self.history_seconds = history_seconds or _DEFAULTS.history_seconds
        environment = Settings.from_env()  # PUSH_STATE_TYPES / PUSH_STATE_SECONDS, as the nodes read them
        self.state_types = frozenset(state_types if state_types is not None else environment.state_types)
        self.state_seconds = environment.state_seconds
        self._sharded: ShardedPublisher | None = None
        if is_cluster_url(redis_url):
            self._sharded = ShardedPublisher(redis_url)
            return
        self._client = self.client_class.from_url(redis_url)
        self._script = self._client.register_script(PUBLISH_SCRIPT)

    def _envelope(self, event_type: str, payload: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], bytes]:
        kwargs.setdefault("allow_unknown", self.allow_unknown)
        return prepare(event_type, payload, source=self.source, **kwargs)

    async def _publish_sharded(self, event_type: str, payload: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        assert self._sharded is not None
        channel, envelope, data = self._envelope(event_type, payload, kwargs)
        seq = await self._sharded.publish(
            channel,
            data,
            envelope["id"],
            envelope.get("userId"),
            self.history_size,
            self.history_seconds,
            self._state_seconds(event_type),
        )
        if seq:
            envelope["seq"] = seq  # as every receiver gets it (cluster/state.py)
        EVENTS_PUBLISHED.inc()
        return envelope

    def _script_call(self, event_type: str, payload: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The envelope, and the pending script call that stores and publishes it."""
        channel, envelope, data = self._envelope(event_type, payload, kwargs)
        state_seconds = self._state_seconds(event_type)
        args = publish_args(
            channel,
            data,
            envelope["id"],
            self.history_size,
            self.history_seconds,
            envelope.get("userId"),
            state_seconds,
        )
        return envelope, self._script(keys=publish_keys(channel, state_seconds is not None), args=args)

    def _state_seconds(self, event_type: str) -> int | None:
        """How long a state channel's latest value is kept; None for other channels (cluster/state.py)."""
        return self.state_seconds if event_type in self.state_types else None


class EventPublisher(_PublisherBase):
    """Publishes events from asyncio code."""

    client_class = aioredis.Redis

    async def publish(self, event_type: str, payload: Any, **kwargs: Any) -> dict[str, Any]:
        """Publish one event; keyword arguments as :func:`prepare`. Returns the envelope."""
        if self._sharded is not None:
            return await self._publish_sharded(event_type, payload, kwargs)
        envelope, call = self._script_call(event_type, payload, kwargs)
        _add_seq(envelope, await call)
        EVENTS_PUBLISHED.inc()
        return envelope

    async def close(self) -> None:
        if self._sharded is not None:
            await self._sharded.close()
        else:
            await self._client.aclose()


class SyncEventPublisher(_PublisherBase):
    """Publishes events from synchronous code (on a Redis Cluster through a private event loop)."""

    client_class = redis.Redis
    _loop: asyncio.AbstractEventLoop | None = None

    def publish(self, event_type: str, payload: Any, **kwargs: Any) -> dict[str, Any]:
        """Publish one event; keyword arguments as :func:`prepare`. Returns the envelope."""
        if self._sharded is not None:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(self._publish_sharded(event_type, payload, kwargs))
        envelope, result = self._script_call(event_type, payload, kwargs)  # the sync client has run it
        _add_seq(envelope, result)
        EVENTS_PUBLISHED.inc()
        return envelope

    def close(self) -> None:
        if self._sharded is None:
            self._client.close()
            return
        loop = self._loop or asyncio.new_event_loop()
        loop.run_until_complete(self._sharded.close())
        loop.close()
        self._loop = None


def _add_seq(envelope: dict[str, Any], script_result: Any) -> None:
    """A state channel's script returns {receivers, seq}: the envelope every receiver got has ``seq``."""
    if isinstance(script_result, list) and len(script_result) == 2:
        envelope["seq"] = int(script_result[1])
