"""State channels (market data): the latest value of each channel, and its sequence number.

A channel whose type is a state type (``PUSH_STATE_TYPES``, default
``market.ticker`` and ``market.orderbook``) keeps, beside its history:

- ``push:state:<channel>`` (on a Redis Cluster ``push:state:{<channel>}``, in the
  slot of the channel's history): a hash with ``s``, the channel's sequence
  number (1, 2, 3… one per publish, never reused while the key lives) and ``e``,
  the latest envelope. It expires ``PUSH_STATE_SECONDS`` after the last publish;
- ``push:state:channels:<type>``: the set of the type's state channels, for a
  wildcard subscribe (``market.ticker:*``).

The SDK's publish script writes both with the history, and adds the sequence number to
the envelope as its last field, ``"seq":N`` (:func:`with_seq`): the live message is
still a plain JSON envelope. Nodes copy it into the ``event`` message beside
``cursor``, answer a subscribe with the latest values (:class:`LatestValues`) when it
asks (``options.snapshot``), and clients detect gaps with it.

Pure but for :class:`LatestValues`, which reads Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.channels import ChannelError, Pattern, parse_channel
from cluster.redis_url import AsyncClient

STATE_PREFIX = "push:state:"
STATE_SET_PREFIX = "push:state:channels:"


def state_key(channel: str, cluster: bool) -> str:
    return f"{STATE_PREFIX}{{{channel}}}" if cluster else STATE_PREFIX + channel


def state_set_key(event_type: str) -> str:
    return STATE_SET_PREFIX + event_type


def with_seq(seq: int, envelope: bytes) -> bytes:
    """The envelope with its channel's sequence number as its last field: ``{…,"seq":N}``.

    The publish script does the same in Lua (``string.sub(e, 1, -2) .. ',"seq":' .. n .. '}'``),
    so history, the latest value and the live message all carry it, and ``PUBLISH
    events:<channel>`` still carries a plain JSON envelope (SPEC §3).
    """
    return b'%s,"seq":%d}' % (envelope.rstrip()[:-1], seq)


@dataclass(frozen=True, slots=True)
class Latest:
    """One state channel's latest value (its envelope carries its ``seq``)."""

    channel: str
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The latest values a pattern matches; ``left_out`` channels beyond the limit were not read."""

    values: list[Latest]
    left_out: int = 0


class LatestValues:
    """Reads state channels' latest values for a subscribe (on one Redis or a Redis Cluster)."""

    def __init__(self, client: AsyncClient, state_types: tuple[str, ...], max_channels: int, *, cluster: bool) -> None:
        self._client = client
        self.state_types = state_types
        self.max_channels = max_channels
        self.cluster = cluster

    def types_of(self, pattern: Pattern) -> list[str]:
        """The state type a pattern names (``market.ticker``, ``market.ticker:*``, ``market.ticker:BTC``).

        Type wildcards (``*``, ``market.*``) get no snapshot: they are event feeds across many
        types, and a snapshot of every state channel of the domain is rarely what they want.
        """
        return [pattern.typepat] if pattern.typepat in self.state_types else []

    async def snapshot(self, pattern: Pattern) -> Snapshot:
        """The latest value of every state channel ``pattern`` matches, at most ``max_channels``."""
        types = self.types_of(pattern)
        if not types:
            return Snapshot([])
        exact = pattern.keypat not in ("", "*")
        if exact and len(types) == 1:
            names = [f"{types[0]}:{pattern.keypat}"]
        else:
            names = []
            for event_type in types:
                names.extend(raw.decode() for raw in await self._client.smembers(state_set_key(event_type)))
            names = sorted(name for name in set(names) if _matches(pattern, name))
        left_out = max(0, len(names) - self.max_channels)
        names = names[: self.max_channels]
        if not names:
            return Snapshot([], left_out)
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hget(state_key(name, self.cluster), "e")
        values = [
            Latest(name, envelope)
            for name, envelope in zip(names, await pipe.execute(), strict=True)
            if envelope is not None
        ]
        return Snapshot(values, left_out)


def _matches(pattern: Pattern, name: str) -> bool:
    try:
        return pattern.matches(parse_channel(name))
    except ChannelError:
        return False
