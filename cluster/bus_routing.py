"""Which Redis channels carry which events, and what a node must subscribe to (SPEC §3). Pure: no I/O.

Events are sharded across nodes, not only connections:

- a private event (``userId`` set) published by the SDK travels on its user's
  channel ``push:user:{<userId>}`` and on ``push:admin``, as the routed message
  ``<channel> <envelope>`` (the event's channel, one space, the envelope JSON);
  only nodes holding a connection of that user (or an admin) subscribe to them;
- public and broadcast events travel on ``events:<channel>``, and a node
  subscribes only to the exact channels and the narrowest glob patterns its
  connections' subscription patterns can match;
- ``spirit:events`` (legacy) is always subscribed.

A plain ``PUBLISH events:<channel> <envelope>`` of a private event still reaches
every node whose subscriptions cover the channel: compatible, but it costs every
interested node (counted in ``bus_plain_private_events_total``).

A bus subscription is named by a :data:`BusName`: a channel for SUBSCRIBE, or a
glob (containing ``*``) for PSUBSCRIBE. Channel names cannot contain ``*``, so
one string says which it is.
"""

from __future__ import annotations

import zlib
from typing import Iterable

from cluster.channels import ANY, NO_KEY, Channel, Pattern

EVENTS_PREFIX = "events:"
EVENTS_PREFIX_BYTES = EVENTS_PREFIX.encode()
LEGACY_CHANNEL = "spirit:events"
USER_PREFIX = "push:user:{"
USER_SUFFIX = "}"
ADMIN_CHANNEL = "push:admin"
ADMIN_SHARD_PREFIX = "push:admin:{"
ADMIN_SHARD_COUNT = 16
ROUTED_SEPARATOR = b" "

BusName = str
"""A bus subscription: a channel (SUBSCRIBE) or a glob with ``*`` (PSUBSCRIBE)."""


def is_glob(name: BusName) -> bool:
    return "*" in name


def user_channel(user_id: str) -> str:
    """The bus channel of one user's private events (hash-tagged: one Redis Cluster slot per user)."""
    return f"{USER_PREFIX}{user_id}{USER_SUFFIX}"


def admin_shard_channels() -> tuple[str, ...]:
    """On a Redis Cluster, ``push:admin`` is spread over these sharded channels (one slot each)."""
    return tuple(f"{ADMIN_SHARD_PREFIX}{i}{USER_SUFFIX}" for i in range(ADMIN_SHARD_COUNT))


def admin_shard_channel(user_id: str) -> str:
    """The sharded admin channel that carries ``user_id``'s private events on a Redis Cluster."""
    return f"{ADMIN_SHARD_PREFIX}{zlib.crc32(user_id.encode()) % ADMIN_SHARD_COUNT}{USER_SUFFIX}"


def is_sharded(name: BusName) -> bool:
    """Whether a Redis Cluster carries this bus name on sharded pub/sub (SSUBSCRIBE/SPUBLISH)."""
    return name.startswith(USER_PREFIX) or name == ADMIN_CHANNEL


def routed_message(channel: str, envelope: bytes) -> bytes:
    """What the SDK publishes on a user channel and ``push:admin``: ``<channel> <envelope>``."""
    return channel.encode() + ROUTED_SEPARATOR + envelope


def split_routed(message: bytes) -> tuple[bytes, bytes]:
    """(channel, envelope) of a routed message; the channel is empty when there is no separator."""
    channel, sep, envelope = message.partition(ROUTED_SEPARATOR)
    if not sep:
        return b"", message
    return channel, envelope


def identity_interest(user_id: str | None, is_admin: bool) -> tuple[BusName, ...]:
    """The bus channels a connection needs for being who it is (its private events)."""
    names: list[BusName] = []
    if user_id is not None:
        names.append(user_channel(user_id))
    if is_admin:
        names.append(ADMIN_CHANNEL)
    return tuple(names)


def pattern_interest(pattern: Pattern, anonymous: bool, public_domains: Iterable[str]) -> tuple[BusName, ...]:
    """The narrowest ``events:`` subscriptions that carry every event ``pattern`` can match.

    An anonymous connection can only see public events, so its ``*`` is narrowed to
    the public domains instead of taking the whole bus.
    """
    if pattern.typepat == ANY and anonymous:
        return tuple(
            name
            for domain in sorted(public_domains)
            for name in pattern_interest(Pattern(f"{domain}.*", pattern.keypat), False, ())
        )
    typepat, keypat = pattern
    base = EVENTS_PREFIX + typepat
    if typepat == ANY or typepat.endswith(".*"):
        if keypat == NO_KEY:
            return (base,)  # the glob's * also spans ":<key>"
        return (f"{base}:{keypat}",)
    if keypat == NO_KEY:
        return (base, base + ":*")
    return (f"{base}:{keypat}",)


def covering_names(channel: Channel) -> tuple[BusName, ...]:
    """Every bus subscription :func:`pattern_interest` can create that carries ``channel``, exact first.

    Redis delivers a message once per matching subscription of a client; the reader
    uses this list to process each event once however many of them the node holds.
    """
    exact = EVENTS_PREFIX + str(channel)
    domain = EVENTS_PREFIX + channel.domain + ".*"
    everything = EVENTS_PREFIX + ANY
    if channel.key is None:
        return (exact, domain, everything)
    key = channel.key
    return (
        exact,
        f"{EVENTS_PREFIX}{channel.type}:*",
        domain,
        f"{domain}:{key}",
        f"{domain}:*",
        everything,
        f"{everything}:{key}",
        f"{everything}:*",
    )
