"""Recovery on subscribe (SPEC §8): replay what a client missed, then go live.

A subscribe with ``options.since`` first registers its subscriptions in holding
mode: live events matched through them are kept aside (bounded) instead of
sent. Then history after the cursor is read from Redis, the ack reports
``recovered`` per channel, the missed events the client may see are offered in
order through the normal outbound path (so they count against the push rate),
and finally the held live events are offered, skipping any that the replay
already sent. Nothing is lost at the seam and nothing is sent twice.
"""

from __future__ import annotations

import logging

from cluster import protocol
from cluster.broker import BUS_ERRORS
from cluster.channels import ANY, NO_KEY, Pattern, candidate_patterns, parse_channel
from cluster.clock import now_ms
from cluster.envelope import EnvelopeError, parse_envelope
from cluster.history import Cursor, History, Replay, make_cursor, parse_cursor
from cluster.logs import log
from cluster.state import LatestValues, Snapshot
from node.connection import ClientConnection, Subscription, count_drop, text_frame
from node.deltas import full_event
from node.hub import EVENTS_PREFIX_BYTES, Hub
from node.queue import CONFLATED_TYPES

EVERYTHING = Pattern(ANY, NO_KEY)
CATCH_UP_LIMIT = 20_000
CATCH_UP_OVERLAP_SECONDS = 10.0


class Recovery:
    """Replays history for one node's subscriptions."""

    def __init__(
        self, hub: Hub, history: History | None, max_envelope_bytes: int, latest: LatestValues | None = None
    ) -> None:
        self.hub = hub
        self.history = history
        self.max_envelope_bytes = max_envelope_bytes
        self.latest = latest

    async def snapshots(self, patterns: list[Pattern]) -> dict[Pattern, Snapshot]:
        """The latest values of the state channels each pattern matches; nothing while Redis is away."""
        if self.latest is None:
            return {}
        found: dict[Pattern, Snapshot] = {}
        try:
            for pattern in patterns:
                if self.latest.types_of(pattern):
                    found[pattern] = await self.latest.snapshot(pattern)
        except BUS_ERRORS as exc:
            log("snapshot_failed", logging.WARNING, node=self.hub.node_id, reason=type(exc).__name__)
        return found

    async def fetch(self, since: str, patterns: list[Pattern]) -> dict[Pattern, Replay]:
        """History after the cursor ``since`` for each pattern; unknown or lost cursors recover nothing."""
        cursor = parse_cursor(since)
        if cursor is None or self.history is None:
            return {}
        try:
            return await self.history.after(cursor, patterns)
        except BUS_ERRORS as exc:
            log("recovery_failed", logging.WARNING, node=self.hub.node_id, reason=type(exc).__name__)
            return {}

    async def position(self) -> str | None:
        """A cursor for "now", or None without history (or while Redis is away)."""
        if self.history is None:
            return None
        try:
            return await self.history.position()
        except BUS_ERRORS:
            return None

    async def catch_up(self, last_position: str | None, connections: list[ClientConnection]) -> int:
        """After a bus reconnect, deliver from history what was published while the node was away.

        ``last_position`` is a position cursor read while the bus was up. If Redis came
        back with a new epoch, its whole (new) history was published after the outage
        began. Events already delivered are skipped by the hub's recent-id memory. If
        history cannot cover the gap, subscribed clients get ``lagged`` with reason
        ``bus_interrupted`` (``dropped`` 0: the count is unknown) instead of silence.
        """
        if self.history is None or last_position is None:
            return 0
        cursor = parse_cursor(last_position)
        try:
            epoch = await self.history.epoch()
            if cursor is None or cursor.epoch != epoch:
                cursor = Cursor(epoch, position=b"0-0")
            replays = await self.history.after(cursor, [EVERYTHING], limit=CATCH_UP_LIMIT)
        except BUS_ERRORS:
            replays = {}
        replay = replays.get(EVERYTHING)
        if replay is None or not replay.recovered:
            for conn in connections:
                if conn.subscriptions:
                    conn.send_control(protocol.lagged(0, "bus_interrupted"))
            return 0
        self.hub.expect_overlap(CATCH_UP_OVERLAP_SECONDS)
        for name, raw in replay.events:
            self.hub.on_bus_message(EVENTS_PREFIX_BYTES + name.encode(), raw, replayed=True)
        return len(replay.events)

    def resume(
        self,
        conn: ClientConnection,
        subscriptions: list[Subscription],
        replays: dict[Pattern, Replay],
        snapshots: dict[Pattern, Snapshot] | None = None,
    ) -> None:
        """Offer replayed events (or, without them, state snapshots) then held ones, once each, and go live.

        A held live event of a state channel that is not newer than what the replay or the
        snapshot already gave for that channel is skipped: the client never steps back.
        """
        sent: set[str] = set()
        newest: dict[str, int] = {}  # state channel -> highest seq offered so far
        for subscription in subscriptions:
            replay = replays.get(subscription.pattern)
            if replay is not None and replay.recovered:
                for channel_name, raw in replay.events:
                    self._offer_history(conn, subscription, channel_name, raw, sent, newest)
            elif snapshots and (snapshot := snapshots.get(subscription.pattern)) is not None:
                for latest in snapshot.values:
                    self._offer_history(conn, subscription, latest.channel, latest.envelope, sent, newest, snapshot=True)
        for subscription in subscriptions:
            held, subscription.held = subscription.held or [], None
            for event_id, frame, rank, expires_at, conflate, timestamp, name, seq, delta in held:
                if event_id in sent:
                    continue
                if seq is not None and seq <= newest.get(name, 0):
                    continue  # older than the state the client already has
                sent.add(event_id)
                if expires_at is not None and expires_at < now_ms():
                    continue
                conn.offer(frame, rank, expires_at, conflate, subscription.bucket, timestamp, delta)

    def _offer_history(
        self,
        conn: ClientConnection,
        subscription: Subscription,
        name: str,
        raw: bytes,
        sent: set[str],
        newest: dict[str, int],
        snapshot: bool = False,
    ) -> None:
        """Offer one replayed event, or with ``snapshot`` a state channel's latest value (marked so)."""
        try:
            envelope = parse_envelope(raw, self.max_envelope_bytes)
            channel = parse_channel(name)
        except (EnvelopeError, ValueError):
            count_drop("malformed")
            return
        if envelope.id in sent or envelope.priority > subscription.max_rank:
            return
        if envelope.expires_at is not None and envelope.expires_at < now_ms():
            return
        if not self.hub.may_receive(conn, envelope, channel.domain):
            return
        sent.add(envelope.id)
        seq = envelope.seq
        if seq is not None and seq > newest.get(name, 0):
            newest[name] = seq
            self.hub.newer_state(name, seq, envelope.timestamp)  # a live value older than this, arriving late, is dropped
        cursor = make_cursor(self.hub.epoch, name, envelope.id)
        frame = text_frame(protocol.event_frame(name, raw, cursor, seq, snapshot))
        conflate = name if channel.type in CONFLATED_TYPES else None
        delta = None
        patterns = conn.delta_patterns
        if seq is not None and patterns is not None and not patterns.isdisjoint(candidate_patterns(channel)):
            # On a delta channel a replay or snapshot is always a full event: it starts the chain
            # again, and becomes the base of the next live event's delta if it is the newest.
            delta = full_event(name, raw, cursor, (seq, envelope.id), snapshot)
            self.hub.deltas.remember(name, delta.key, raw)
        conn.offer(
            frame, envelope.priority, envelope.expires_at, conflate, subscription.bucket, envelope.timestamp, delta
        )
