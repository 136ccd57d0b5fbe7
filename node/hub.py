"""Hub tracks client connections on this node and decides who receives each event.

Connections are indexed by user and subscriptions by normalized pattern, so an
event costs a handful of dict lookups (the patterns that can match its channel)
plus the subscribers that matched — never a scan over every connection. A
private event (one with a ``userId``) only looks at that user's connections and
at admins. The event frame is encoded once per event and the same bytes are
handed to every recipient.

The hub also tells the bus what this node needs (SPEC §3 bus routing): each
connection holds its user's channel (and ``push:admin`` for admins), each
subscription the ``events:`` names its pattern needs. A bus message is checked
against local interest by its channel name before its envelope is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Iterable, Iterator

import orjson

from cluster import protocol
from cluster.broker import Broker
from cluster.bus_routing import (
    ADMIN_CHANNEL,
    EVENTS_PREFIX_BYTES,
    LEGACY_CHANNEL,
    USER_PREFIX,
    USER_SUFFIX,
    identity_interest,
    pattern_interest,
    split_routed,
)
from cluster.channels import Channel, ChannelError, Pattern, candidate_patterns, parse_channel
from cluster.clock import now_ms
from cluster.envelope import Envelope, EnvelopeError, parse_envelope, wrap_legacy
from cluster.history import make_cursor
from cluster.logs import RateLimitedLog
from cluster.metrics import BUS_COUNTS, BUS_PLAIN_PRIVATE, EVENTS_DELIVERED, EVENTS_PUBLISHED, SUBSCRIPTIONS_ACTIVE
from node.connection import (
    WRITE_HIGH_WATER,
    ClientConnection,
    Subscription,
    count_drop,
    observe_latency,
    text_frame,
)
from node.deltas import DeltaChannels, DeltaEvent
from node.queue import CONFLATED_TYPES

LEGACY_CHANNEL_BYTES = LEGACY_CHANNEL.encode()
USER_PREFIX_BYTES = USER_PREFIX.encode()
ADMIN_CHANNEL_BYTES = ADMIN_CHANNEL.encode()
USER_ID_SLICE = slice(len(USER_PREFIX), -len(USER_SUFFIX))
CHANNEL_CACHE_SIZE = 10_000
STATE_CHANNELS_TRACKED = 100_000
RECENT_IDS = 20_000  # event ids remembered to make a bus catch-up idempotent
DELIVERED_LIVE = 1  # recent-id flags: seen on the live stream...
DELIVERED_REPLAY = 2  # ...or delivered to everyone by a bus catch-up

# Who a private event goes to, by the bus channel it came on: its user channel reaches the
# user's connections, push:admin the admins (other than the user), events: both.
TO_ALL, TO_OWNERS, TO_ADMINS = 0, 1, 2

ChannelEntry = tuple[str, Channel, tuple[Pattern, ...]]


class Hub:
    def __init__(
        self, node_id: str, public_domains: Iterable[str], max_envelope_bytes: int, bus: Broker | None = None
    ) -> None:
        self.node_id = node_id
        self.public_domains = frozenset(public_domains)
        self.max_envelope_bytes = max_envelope_bytes
        self.bus = bus
        self.epoch = ""
        self.connections: dict[str, ClientConnection] = {}
        self.by_user: dict[str, set[ClientConnection]] = {}
        self.admins: set[ClientConnection] = set()
        self.index: dict[Pattern, dict[ClientConnection, Subscription]] = {}
        self._channels: dict[bytes, ChannelEntry] = {}  # bus channel -> parsed
        self._routed: dict[bytes, ChannelEntry] = {}  # channel name of a routed message -> parsed
        self._log_bad_event = RateLimitedLog(per_second=5)
        self._recent_ids: OrderedDict[str, int] = OrderedDict()
        self._state_seqs: dict[str, tuple[int, int]] = {}  # state channel -> (seq, timestamp) newest seen
        self._overlap_until = 0.0  # monotonic time until which live events may repeat a catch-up
        self.deltas = DeltaChannels()  # previous envelopes of state channels with delta subscribers

    # --- connections and subscriptions -------------------------------------------

    def add(self, conn: ClientConnection) -> None:
        self.connections[conn.id] = conn
        self._index_identity(conn)

    def remove(self, conn: ClientConnection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        for pattern in list(conn.subscriptions):
            self.unsubscribe(conn, pattern)
        self._unindex_identity(conn)

    def reidentify(self, conn: ClientConnection, identity: object) -> None:
        """Swap a connection's identity (token refresh) keeping the indexes and the bus interest right."""
        self._unindex_identity(conn)
        conn.identity = identity  # type: ignore[assignment]
        self._index_identity(conn)
        for subscription in conn.subscriptions.values():
            self._want(subscription, self._pattern_names(conn, subscription.pattern))

    def _index_identity(self, conn: ClientConnection) -> None:
        if conn.user_id is not None:
            self.by_user.setdefault(conn.user_id, set()).add(conn)
        if conn.identity.is_admin:
            self.admins.add(conn)
        conn.bus_names = identity_interest(conn.user_id, conn.identity.is_admin)
        if self.bus is not None:
            self.bus.want(conn.bus_names)

    def _unindex_identity(self, conn: ClientConnection) -> None:
        if conn.user_id is not None:
            peers = self.by_user.get(conn.user_id)
            if peers is not None:
                peers.discard(conn)
                if not peers:
                    del self.by_user[conn.user_id]
        self.admins.discard(conn)
        if self.bus is not None:
            self.bus.unwant(conn.bus_names)
        conn.bus_names = ()

    def _pattern_names(self, conn: ClientConnection, pattern: Pattern) -> tuple[str, ...]:
        return pattern_interest(pattern, conn.user_id is None, self.public_domains)

    def _want(self, subscription: Subscription, names: tuple[str, ...]) -> None:
        """Hold ``names`` for a subscription instead of what it held before."""
        if self.bus is not None:
            self.bus.want(names)
            self.bus.unwant(subscription.bus_names)
        subscription.bus_names = names

    def bus_names(self, conn: ClientConnection) -> list[str]:
        """Every bus name a connection holds (what a subscribe waits for before its ack)."""
        names = list(conn.bus_names)
        for subscription in conn.subscriptions.values():
            names.extend(subscription.bus_names)
        return names

    def may_subscribe(self, conn: ClientConnection, pattern: Pattern) -> bool:
        """Anonymous connections may only name public domains (``*`` is filtered instead)."""
        if conn.user_id is not None:
            return True
        return pattern.domain is None or pattern.domain in self.public_domains

    def subscribe(self, conn: ClientConnection, subscription: Subscription) -> None:
        pattern = subscription.pattern
        previous = conn.subscriptions.get(pattern)
        if previous is None:
            SUBSCRIPTIONS_ACTIVE.inc()
        else:
            subscription.bus_names = previous.bus_names
        self._want(subscription, self._pattern_names(conn, pattern))
        conn.subscriptions[pattern] = subscription
        self.index.setdefault(pattern, {})[conn] = subscription
        conn.set_delta(pattern, subscription.delta)

    def unsubscribe(self, conn: ClientConnection, pattern: Pattern) -> None:
        subscription = conn.subscriptions.pop(pattern, None)
        if subscription is None:
            return
        self._want(subscription, ())
        conn.set_delta(pattern, False)
        SUBSCRIPTIONS_ACTIVE.dec()
        subscribers = self.index.get(pattern)
        if subscribers is not None:
            subscribers.pop(conn, None)
            if not subscribers:
                del self.index[pattern]

    def expect_overlap(self, seconds: float) -> None:
        """A catch-up is replaying history: live events may repeat it for ``seconds``."""
        self._overlap_until = time.monotonic() + seconds

    def may_receive(self, conn: ClientConnection, envelope: Envelope, domain: str) -> bool:
        """SPEC §3 authorization of one event for one connection (the replay path's check)."""
        identity = conn.identity
        if envelope.user_id is not None and envelope.user_id != identity.user_id and not identity.is_admin:
            return False
        if envelope.session_id is not None and envelope.session_id != identity.session_id and not identity.is_admin:
            return False
        return domain in self.public_domains or identity.user_id is not None

    # --- events: the hot path ----------------------------------------------------------

    def on_bus_message(self, bus_channel: bytes, data: bytes, replayed: bool = False) -> None:
        """Route one bus message by its bus channel; parse it only if a local connection may want it.

        ``replayed`` marks events a bus catch-up takes from history: those, and live
        events for a short while after a catch-up, are skipped if already delivered.
        Otherwise ids are not checked, so a publisher reusing an id is not silenced.
        """
        counts = BUS_COUNTS
        try:
            if bus_channel.startswith(USER_PREFIX_BYTES):
                counts.user += 1
                self._on_user_message(bus_channel, data)
            elif bus_channel.startswith(EVENTS_PREFIX_BYTES):
                if not replayed:
                    counts.events += 1
                self._on_events_message(bus_channel, data, replayed)
            elif bus_channel == ADMIN_CHANNEL_BYTES:
                counts.admin += 1
                self._on_admin_message(data)
            elif bus_channel == LEGACY_CHANNEL_BYTES:
                counts.legacy += 1
                envelope = self._parse_legacy(data)
                channel = Channel(envelope.type, None)
                self._accept(envelope.type, channel, candidate_patterns(channel), envelope, TO_ALL, False)
            else:
                raise ChannelError("not a bus channel")
        except (EnvelopeError, ChannelError, UnicodeDecodeError) as exc:
            self._malformed(bus_channel, exc)

    def _on_events_message(self, bus_channel: bytes, data: bytes, replayed: bool) -> None:
        name, channel, candidates = self._channel(bus_channel)
        index = self.index
        for pattern in candidates:
            if pattern in index:
                break
        else:
            BUS_COUNTS.unwanted += 1
            return
        envelope = parse_envelope(data, self.max_envelope_bytes)
        if envelope.type != channel.type:
            raise EnvelopeError("channel_mismatch", f"type {envelope.type} published on channel {name}")
        if envelope.user_id is not None and not replayed:
            BUS_PLAIN_PRIVATE.inc()
        self._accept(name, channel, candidates, envelope, TO_ALL, replayed)

    def _on_user_message(self, bus_channel: bytes, data: bytes) -> None:
        """A private event on its user's channel: only that user's connections here can want it."""
        user_id = bus_channel[USER_ID_SLICE].decode()
        routed = self._parse_routed(data, self.by_user.get(user_id))
        if routed is not None:
            name, channel, candidates, envelope = routed
            if envelope.user_id != user_id:
                raise EnvelopeError("channel_mismatch", f"an event of another user on the channel of {user_id}")
            self._accept(name, channel, candidates, envelope, TO_OWNERS, False)

    def _on_admin_message(self, data: bytes) -> None:
        """A private event on ``push:admin``: for this node's admins other than its user."""
        routed = self._parse_routed(data, self.admins)
        if routed is not None:
            name, channel, candidates, envelope = routed
            if envelope.user_id is None:
                raise EnvelopeError("missing_user", "an event without userId on push:admin")
            self._accept(name, channel, candidates, envelope, TO_ADMINS, False)

    def _parse_routed(
        self, data: bytes, recipients: set[ClientConnection] | None
    ) -> tuple[str, Channel, tuple[Pattern, ...], Envelope] | None:
        """A routed message (``<channel> <envelope>``) parsed only if one of ``recipients`` may want it."""
        if not recipients:
            BUS_COUNTS.unwanted += 1  # e.g. the user left this node: the linger keeps the channel a moment
            return None
        channel_name, raw = split_routed(data)
        name, channel, candidates = self._routed_channel(channel_name)
        if not any(_wants(conn, candidates) for conn in recipients):
            BUS_COUNTS.unwanted += 1
            return None
        envelope = parse_envelope(raw, self.max_envelope_bytes)
        if envelope.type != channel.type:
            raise EnvelopeError("channel_mismatch", f"type {envelope.type} published on channel {name}")
        return name, channel, candidates, envelope

    def _accept(
        self,
        name: str,
        channel: Channel,
        candidates: tuple[Pattern, ...],
        envelope: Envelope,
        route: int,
        replayed: bool,
    ) -> None:
        """Skip what a bus catch-up already delivered, remember the id, deliver."""
        recent = self._recent_ids
        if replayed:
            if envelope.id in recent:
                return  # delivered live before the outage was noticed
            recent[envelope.id] = DELIVERED_REPLAY
        else:
            seen = recent.get(envelope.id)
            if seen is None:
                recent[envelope.id] = DELIVERED_LIVE
            elif seen == DELIVERED_REPLAY and self._overlap_until > time.monotonic():
                return  # the catch-up after a reconnect overlaps the live stream
        if len(recent) > RECENT_IDS:
            recent.popitem(last=False)
        if envelope.seq is not None and not self.newer_state(name, envelope.seq, envelope.timestamp):
            count_drop("stale")  # an older value of a state channel arriving late (cluster bus reordering)
            return
        EVENTS_PUBLISHED.inc()
        self.dispatch(name, channel, candidates, envelope, route)

    def newer_state(self, name: str, seq: int, timestamp: int) -> bool:
        """Note a state channel's value; False if this node already had it or a newer one.

        A Redis Cluster broadcasts public messages over the cluster bus, so a value published
        just before a subscribe can arrive after the snapshot that already holds a newer one:
        a client must never step back to it. A value is old only if both its seq and its
        timestamp are not above the newest seen: a channel whose counter started again (Redis
        flushed, the latest value expired) has newer timestamps and is taken.
        """
        seqs = self._state_seqs
        last = seqs.get(name)
        if last is not None and seq <= last[0] and timestamp <= last[1]:
            return False
        if last is None and len(seqs) >= STATE_CHANNELS_TRACKED:
            seqs.clear()  # bounded; forgetting only loses the guard against late values for a moment
        seqs[name] = (seq, timestamp)
        return True

    def _malformed(self, bus_channel: bytes, exc: Exception) -> None:
        count_drop("malformed")
        self._log_bad_event(
            "malformed_event",
            logging.WARNING,
            node=self.node_id,
            reason=getattr(exc, "reason", "invalid_channel"),
            channel=bus_channel[:200].decode(errors="replace"),
            detail=str(exc)[:200],
        )

    def dispatch(
        self, name: str, channel: Channel, candidates: tuple[Pattern, ...], envelope: Envelope, route: int = TO_ALL
    ) -> int:
        """Deliver one parsed event; returns how many connections it was written to now."""
        if envelope.expires_at is not None and envelope.expires_at < now_ms():
            count_drop("expired")
            return 0
        recipients = self._recipients(channel, candidates, envelope, route)
        if recipients is None:
            return 0
        cursor = make_cursor(self.epoch, name, envelope.id)
        seq = envelope.seq
        frame = text_frame(protocol.event_frame(name, envelope.raw, cursor, seq))
        rank, expires_at, timestamp = envelope.priority, envelope.expires_at, envelope.timestamp
        conflate = name if channel.type in CONFLATED_TYPES else None
        now = asyncio.get_running_loop().time()  # the push buckets' clock
        written = 0
        delta: DeltaEvent | None = None  # made for the first delta recipient, shared by the others
        for conn, subscription in recipients:
            if rank > subscription.max_rank:
                continue
            # Delta frames (node.deltas): only state events to connections that asked pay this check;
            # the frame such a recipient gets is chosen as it is written (ClientConnection.delta_frame).
            choice: DeltaEvent | None = None
            if seq is not None and conn.delta_patterns is not None and not conn.delta_patterns.isdisjoint(candidates):
                if delta is None:
                    delta = self.deltas.event(name, envelope.raw, cursor, seq, envelope.id)
                choice = delta
            # The common recipient, inlined (ClientConnection.offer does the same and more):
            # nothing waiting, no subscription limit, a draining socket, a push token.
            if (
                conn.direct
                and subscription.bucket is None
                and subscription.held is None
                and conn.transport.get_write_buffer_size() < WRITE_HIGH_WATER
                and conn.bucket.take(now)
            ):
                conn.transport.write(frame if choice is None else conn.delta_frame(choice))
                if rank == 0 and conn.nagle:
                    conn.push_now()  # p0 never waits for the client's ACK
                written += 1
            elif subscription.held is not None:
                conn.hold(subscription, (envelope.id, frame, rank, expires_at, conflate, timestamp, name, seq, choice))
            elif conn.offer(frame, rank, expires_at, conflate, subscription.bucket, timestamp, choice):
                written += 1
        if written:
            EVENTS_DELIVERED.inc(written)
            observe_latency(timestamp)
        return written

    def _recipients(
        self, channel: Channel, candidates: tuple[Pattern, ...], envelope: Envelope, route: int
    ) -> Iterator[tuple[ClientConnection, Subscription]] | None:
        if envelope.user_id is not None:
            return self._private_recipients(candidates, envelope, route)
        matched = [subs for pattern in candidates if (subs := self.index.get(pattern))]
        if not matched:
            return None
        if len(matched) == 1:
            pairs: Iterable[tuple[ClientConnection, Subscription]] = matched[0].items()
        else:
            pairs = _merge(matched, envelope.priority).items()
        if envelope.session_id is not None:
            sid = envelope.session_id
            return ((c, s) for c, s in pairs if c.identity.session_id == sid or c.identity.is_admin)
        if channel.domain in self.public_domains:
            return iter(pairs)
        return ((c, s) for c, s in pairs if c.identity.user_id is not None)

    def _private_recipients(
        self, candidates: tuple[Pattern, ...], envelope: Envelope, route: int
    ) -> Iterator[tuple[ClientConnection, Subscription]]:
        """Only the event's user and admins can receive it: look at those, not at subscribers."""
        owners = self.by_user.get(envelope.user_id or "", ()) if route != TO_ADMINS else ()
        admins = [a for a in self.admins if a.user_id != envelope.user_id] if route != TO_OWNERS else ()
        sid = envelope.session_id
        for conn in (*owners, *admins):
            if sid is not None and conn.identity.session_id != sid and not conn.identity.is_admin:
                continue
            subscription = _best_subscription(conn, candidates, envelope.priority)
            if subscription is not None:
                yield conn, subscription

    def _channel(self, bus_channel: bytes) -> tuple[str, Channel, tuple[Pattern, ...]]:
        cached = self._channels.get(bus_channel)
        if cached is not None:
            return cached
        if not bus_channel.startswith(EVENTS_PREFIX_BYTES):
            raise ChannelError("not an events channel")
        name = bus_channel[len(EVENTS_PREFIX_BYTES) :].decode()
        channel = parse_channel(name)
        if len(self._channels) >= CHANNEL_CACHE_SIZE:
            self._channels.clear()
        entry = self._channels[bus_channel] = (name, channel, candidate_patterns(channel))
        return entry

    def _routed_channel(self, name: bytes) -> ChannelEntry:
        """The event channel a routed message names (``<channel> <envelope>``), parsed once per name."""
        cached = self._routed.get(name)
        if cached is not None:
            return cached
        text = name.decode()
        channel = parse_channel(text)
        if len(self._routed) >= CHANNEL_CACHE_SIZE:
            self._routed.clear()
        entry = self._routed[name] = (text, channel, candidate_patterns(channel))
        return entry

    def _parse_legacy(self, data: bytes) -> Envelope:
        if len(data) > self.max_envelope_bytes:
            raise EnvelopeError("too_large", "legacy message too large")
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise EnvelopeError("invalid_json", "legacy message is not JSON") from None
        return wrap_legacy(message, data)


def _wants(conn: ClientConnection, candidates: tuple[Pattern, ...]) -> bool:
    """Whether one of the connection's patterns matches the channel (priority aside)."""
    subscriptions = conn.subscriptions
    return any(pattern in subscriptions for pattern in candidates)


def _best_subscription(conn: ClientConnection, candidates: tuple[Pattern, ...], rank: int) -> Subscription | None:
    """The connection's subscription that matches and admits this priority, if any."""
    found = None
    for pattern in candidates:
        subscription = conn.subscriptions.get(pattern)
        if subscription is not None:
            if rank <= subscription.max_rank:
                return subscription
            found = subscription
    return found


def _merge(matched: list[dict[ClientConnection, Subscription]], rank: int) -> dict[ClientConnection, Subscription]:
    """One subscription per connection when several of its patterns match: one that admits the event."""
    merged: dict[ClientConnection, Subscription] = {}
    for subscribers in matched:
        for conn, subscription in subscribers.items():
            current = merged.get(conn)
            if current is None or (current.max_rank < rank <= subscription.max_rank):
                merged[conn] = subscription
    return merged
