"""Delta frames on the node (issue 15, docs/DELTA.md): one state event's frames, built once.

A subscription with ``options.delta: "fossil"`` gets a state channel's events (those with
a ``seq``) with ``data`` as a JSON string: the envelope's exact text (``"delta":false``) or
the Fossil delta from the envelope of ``seq - 1`` (``"delta":true``). Which of the two a
connection gets is decided when the frame is written, not when it is queued: conflation,
drops and expiry happen in between and break the chain. Each connection remembers the
version it last wrote per delta channel (:class:`DeltaEvent.key`, ``(seq, event id)``),
and a delta is written only on top of exactly that version.

:class:`DeltaEvent` is made once per event and shared by every delta recipient (queued
frames hold it), and builds each of its two frames at most once: the delta costs one
``fossil.encode`` per channel version (about 0.2 ms for a 50-level book) whatever the
number of connections. :class:`DeltaChannels` is the hub's memory of each state channel's
previous envelope, the base of the next delta: bounded (LRU), and fed only by events that
had a delta recipient, so nodes without delta subscribers keep nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import orjson

from cluster import fossil, protocol
from cluster.channels import ANY, Pattern
from cluster.wsframes import text_frame

MAX_DELTA_CHANNELS = 10_000  # previous envelopes kept (one per state channel with delta subscribers)

Version = tuple[int, str]
"""(seq, event id) of one state channel's envelope: what a connection last wrote there."""


class DeltaEvent:
    """One state channel event as delta subscribers get it: the full-string frame and, if it pays,
    the delta frame from ``base_key``'s envelope; both built lazily, once, for every recipient."""

    __slots__ = (
        "channel", "raw", "cursor", "seq", "key", "base_key", "_base", "_full", "_delta", "_delta_built", "snapshot"
    )

    def __init__(
        self,
        channel: str,
        raw: bytes,
        cursor: str,
        key: Version,
        base: tuple[Version, bytes] | None,
        snapshot: bool = False,
    ) -> None:
        self.snapshot = snapshot  # a latest value sent on subscribe: its full frame says so
        self.channel = channel
        self.raw = raw
        self.cursor = cursor
        self.seq = key[0]
        self.key = key
        self.base_key = base[0] if base is not None else None
        self._base = base[1] if base is not None else None  # dropped once the delta is built
        self._full: bytes | None = None
        self._delta: bytes | None = None
        self._delta_built = False

    def frame_after(self, last: Version | None) -> bytes:
        """The frame for a connection that last wrote version ``last`` on this channel."""
        if last is not None and last == self.base_key:
            delta = self._delta if self._delta_built else self._build_delta()
            if delta is not None:
                return delta
        return self._full or self._build_full()

    @property
    def full_frame(self) -> bytes:
        return self._full or self._build_full()

    def _build_full(self) -> bytes:
        escaped = orjson.dumps(self.raw.decode())  # an envelope was parsed by orjson: valid UTF-8
        self._full = text_frame(
            protocol.delta_event_frame(self.channel, escaped, False, self.cursor, self.seq, self.snapshot)
        )
        return self._full

    def _build_delta(self) -> bytes | None:
        """The delta frame, or None when it would not be smaller than the full one or not UTF-8
        (the frames differ only in ``data`` and ``true``/``false``: comparing them compares the strings)."""
        base, self._base = self._base, None
        self._delta_built = True
        if base is None:
            return None
        try:
            text = fossil.encode(base, self.raw).decode()
        except ValueError:  # UnicodeDecodeError included: a delta that cannot ride in a JSON string
            return None
        frame = text_frame(protocol.delta_event_frame(self.channel, orjson.dumps(text), True, self.cursor, self.seq))
        if len(frame) >= len(self.full_frame):
            return None
        self._delta = frame
        return frame


def full_event(channel: str, raw: bytes, cursor: str, key: Version, snapshot: bool = False) -> DeltaEvent:
    """A replayed or snapshot event of a delta channel: always full, it resets the chain (DELTA.md)."""
    return DeltaEvent(channel, raw, cursor, key, None, snapshot)


class DeltaChannels:
    """The previous envelope of each state channel that has delta subscribers here (LRU, bounded)."""

    def __init__(self, max_channels: int = MAX_DELTA_CHANNELS) -> None:
        self.max_channels = max_channels
        self._previous: OrderedDict[str, tuple[Version, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._previous)

    def event(self, channel: str, raw: bytes, cursor: str, seq: int, event_id: str) -> DeltaEvent:
        """This event for delta subscribers; it becomes the channel's previous envelope if newer."""
        previous = self._previous.get(channel)
        key = (seq, event_id)
        base = previous if previous is not None and previous[0][0] == seq - 1 else None
        self.remember(channel, key, raw)
        return DeltaEvent(channel, raw, cursor, key, base)

    def remember(self, channel: str, key: Version, raw: bytes) -> None:
        """Keep ``raw`` as the channel's previous envelope unless a newer one is known. A snapshot
        sent to a delta subscriber comes here too, so the next live event is already a delta."""
        previous = self._previous.get(channel)
        if previous is None or previous[0][0] < key[0] or key[0] == 1:  # 1: the channel's state key began again
            self._previous[channel] = (key, raw)
            self._previous.move_to_end(channel)
            if len(self._previous) > self.max_channels:
                self._previous.popitem(last=False)


def may_match_state(pattern: Pattern, state_types: tuple[str, ...]) -> bool:
    """Whether a pattern can match a state channel (what ``options.delta`` applies to)."""
    typepat = pattern.typepat
    if typepat == ANY or typepat in state_types:
        return True
    return typepat.endswith(".*") and any(t.startswith(typepat[:-1]) for t in state_types)
