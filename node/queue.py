"""The bounded, priority-aware queue of events waiting for one connection (SPEC §6).

Pure: no I/O. Events wait here when the connection is over its push rate or its
socket is not draining. The queue holds at most ``max_items`` events and
``max_bytes`` of frames (frames are shared between recipients, so this is an
upper bound of what the connection pins). When it is full:

1. expired events go first;
2. then the oldest event of the lowest priority (p3, then p2, then p1) — the
   incoming event itself if it is the lowest;
3. a p0 event that still cannot be placed raises :class:`SlowConsumer`: the
   connection is closed with 4008 so that it reconnects and recovers.

``market.ticker`` and ``market.orderbook`` are conflated: a newer event on the
same channel replaces the queued one in place. Events leave in arrival order.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from cluster.envelope import PRIORITIES

CONFLATED_TYPES = frozenset({"market.ticker", "market.orderbook"})
LANES = len(PRIORITIES)  # one lane per priority, p0..p3

DropReporter = Callable[[str, int], None]
"""Called with (reason, count) for every event the queue drops."""


class SlowConsumer(Exception):
    """A p0 event cannot be queued: the connection must be closed with 4008."""


class QueuedEvent:
    __slots__ = ("frame", "rank", "expires_at", "channel", "bucket", "timestamp", "seq", "live", "delta")

    def __init__(
        self,
        frame: bytes,
        rank: int,
        expires_at: int | None,
        channel: str | None,
        bucket: object,
        timestamp: int = 0,
        delta: object = None,
    ) -> None:
        self.frame = frame
        self.delta = delta  # a delta channel's event (node.deltas): its frame is chosen when written
        self.timestamp = timestamp
        self.rank = rank
        self.expires_at = expires_at
        self.channel = channel  # set only for conflated channels
        self.bucket = bucket  # the subscription's own rate limit, if any
        self.seq = 0
        self.live = True


class EventQueue:
    def __init__(self, max_items: int, max_bytes: int, report_drop: DropReporter) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._report = report_drop
        self._lanes: tuple[deque[QueuedEvent], ...] = tuple(deque() for _ in range(LANES))
        self._conflated: dict[str, QueuedEvent] = {}
        self._lane_counts = [0] * LANES
        self._seq = 0
        self.count = 0
        self.bytes = 0
        self._next_expiry: int | None = None

    def __len__(self) -> int:
        return self.count

    def push(self, item: QueuedEvent, now_ms: int) -> None:
        """Queue ``item``, applying conflation and the drop policy; may raise SlowConsumer."""
        if item.channel is not None:
            queued = self._conflated.get(item.channel)
            if queued is not None and queued.live:
                if queued.rank == item.rank:
                    self.bytes += len(item.frame) - len(queued.frame)
                    queued.frame, queued.expires_at, queued.bucket = item.frame, item.expires_at, item.bucket
                    queued.delta = item.delta
                    queued.timestamp = item.timestamp
                    self._note_expiry(item.expires_at)
                    self._report("conflated", 1)
                    return
                self._remove(queued)
                self._report("conflated", 1)
        size = len(item.frame)
        while self.count and (self.count >= self.max_items or self.bytes + size > self.max_bytes):
            if self._purge_expired(now_ms):
                continue
            victim_rank = self._lowest_rank()
            if victim_rank < item.rank or (victim_rank == item.rank == 0):
                if item.rank == 0:
                    raise SlowConsumer("p0 event does not fit in the queue")
                self._report("queue_full", 1)
                return
            self._remove(self._oldest_live(victim_rank))
            self._report("queue_full", 1)
        self._seq += 1
        item.seq = self._seq
        self._lanes[item.rank].append(item)
        self._lane_counts[item.rank] += 1
        self.count += 1
        self.bytes += size
        if item.channel is not None:
            self._conflated[item.channel] = item
        self._note_expiry(item.expires_at)

    def peek(self) -> QueuedEvent | None:
        """The oldest live event, left in the queue."""
        best: QueuedEvent | None = None
        for lane in self._lanes:
            while lane and not lane[0].live:
                lane.popleft()
            if lane and (best is None or lane[0].seq < best.seq):
                best = lane[0]
        return best

    def pop(self) -> QueuedEvent | None:
        item = self.peek()
        if item is not None:
            self._lanes[item.rank].popleft()
            self._forget(item)
        return item

    def pop_expired(self, now_ms: int) -> int:
        """Drop expired events at the head; returns how many."""
        dropped = 0
        item = self.peek()
        while item is not None and item.expires_at is not None and item.expires_at < now_ms:
            self.pop()
            dropped += 1
            item = self.peek()
        return dropped

    def clear(self) -> None:
        for lane in self._lanes:
            lane.clear()
        self._conflated.clear()
        self._lane_counts = [0] * LANES
        self.count = self.bytes = 0

    # --- internals -----------------------------------------------------------

    def _note_expiry(self, expires_at: int | None) -> None:
        if expires_at is not None and (self._next_expiry is None or expires_at < self._next_expiry):
            self._next_expiry = expires_at

    def _purge_expired(self, now_ms: int) -> bool:
        """Remove every expired event (only when one can have expired); True if any went."""
        if self._next_expiry is None or self._next_expiry >= now_ms:
            return False
        removed = 0
        self._next_expiry = None
        for lane in self._lanes:
            for item in lane:
                if not item.live or item.expires_at is None:
                    continue
                if item.expires_at < now_ms:
                    self._remove(item)
                    removed += 1
                else:
                    self._note_expiry(item.expires_at)
        if removed:
            self._report("expired", removed)
        return bool(removed)

    def _lowest_rank(self) -> int:
        for rank in range(LANES - 1, -1, -1):
            if self._lane_counts[rank]:
                return rank
        return 0

    def _oldest_live(self, rank: int) -> QueuedEvent:
        lane = self._lanes[rank]
        while not lane[0].live:
            lane.popleft()
        return lane[0]

    def _remove(self, item: QueuedEvent) -> None:
        """Take ``item`` out without touching its lane (it is skipped when reached)."""
        item.live = False
        self._forget(item)

    def _forget(self, item: QueuedEvent) -> None:
        item.live = False
        self._lane_counts[item.rank] -= 1
        self.count -= 1
        self.bytes -= len(item.frame)
        if item.channel is not None and self._conflated.get(item.channel) is item:
            del self._conflated[item.channel]
