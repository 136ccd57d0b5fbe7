"""One client connection on a node: its identity, subscriptions, limits and writer.

Outbound path: the hub hands every matching event's ready-made WebSocket frame
(the same bytes for every recipient) to :meth:`ClientConnection.offer`. When the
connection has push tokens, nothing waiting and a draining socket, the frame is
written to the transport at once. Otherwise it waits in the bounded
:class:`~node.queue.EventQueue`, drained by a writer task that exists only
while something waits and writes every frame it may send in one call.

Every drop is counted in ``events_dropped_total{reason}`` and reported to the
client in one ``lagged`` notice per reason per ``lagged_interval``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from cluster import protocol
from cluster.auth import Identity
from cluster.channels import Pattern
from cluster.clock import now_ms
from cluster.limits import TokenBucket
from cluster.metrics import COALESCING_CONNECTIONS, EVENT_CONSUME_LATENCY, EVENTS_DELIVERED, EVENTS_DROPPED
from cluster.settings import Settings
from cluster.wsframes import PING_FRAME, control_frame, text_frame
from node.deltas import DeltaEvent, Version
from node.queue import EventQueue, QueuedEvent, SlowConsumer

WRITE_HIGH_WATER = 64 * 1024  # bytes in the transport before events wait in the queue
STALL_POLL_SECONDS = 0.02
MIN_DRAIN_SLEEP_SECONDS = 0.02
MAX_DELTA_BASES = 1000  # delta channels whose last written version one connection remembers
# Sustained pushes run 3% under the configured rate: a client timing arrivals sees
# network and scheduling jitter, and must still never count more than the limit
# in a one-second window once the burst is spent.
PACING_MARGIN = 0.97
CLOSE_TIMEOUT_SECONDS = 2.0

_DROPPED = {}  # reason -> labelled counter child, resolved once

HeldEvent = tuple[str, bytes, int, "int | None", "str | None", int, str, "int | None", "DeltaEvent | None"]
"""(event id, frame, rank, expires_at, conflated channel, timestamp, channel, state seq, delta event) of a
live event held during recovery or a snapshot."""


def count_drop(reason: str, n: int = 1) -> None:
    child = _DROPPED.get(reason)
    if child is None:
        child = _DROPPED[reason] = EVENTS_DROPPED.labels(reason)
    child.inc(n)


def push_bucket(per_second: float, burst: float, now: float) -> TokenBucket:
    """A push limit: paced a little under ``per_second``, and once the burst is spent never more
    than the paced rate in any second either, so a catch-up after the node was held up (a GC
    pause, a busy core) cannot bunch with the jitter a client's clock sees."""
    margin = int(per_second * (1 - PACING_MARGIN))  # 3 of 100: 97 in any second
    return TokenBucket(per_second * PACING_MARGIN, burst, now, window_limit=max(1, int(per_second) - margin))


class Subscription:
    """One pattern a connection subscribed to, with its options."""

    __slots__ = ("pattern", "max_rank", "bucket", "held", "bus_names", "delta")

    def __init__(self, pattern: Pattern, max_rank: int, bucket: TokenBucket | None, delta: bool = False) -> None:
        self.pattern = pattern
        self.max_rank = max_rank  # deliver events with priority rank <= this (3 admits all)
        self.bucket = bucket  # options.limit, if lower than the connection's rate
        self.delta = delta  # options.delta: state channels' events as delta frames (node.deltas)
        self.held: list[HeldEvent] | None = None  # live events kept aside until the ack (and history) is out
        self.bus_names: tuple[str, ...] = ()  # the bus subscriptions this pattern holds on the node


class ClientConnection:
    """A connected client and the one place its outbound limits are applied."""

    __slots__ = (
        "id",
        "identity",
        "ws",
        "transport",
        "remote",
        "subscriptions",
        "bus_names",
        "_loop",
        "bucket",
        "_settings",
        "queue",
        "_drainer",
        "_stall_seconds",
        "_lagged_interval",
        "_lagged",
        "_lagged_timer",
        "closing",
        "direct",
        "close_code",
        "close_reason",
        "heard",
        "pinged",
        "nagle",
        "caught_up_rounds",
        "widest_window",
        "delta_patterns",
        "delta_last",
        "__weakref__",
    )  # thousands per node: no per-instance dict

    def __init__(
        self,
        connection_id: str,
        identity: Identity,
        ws: Any,  # web.WebSocketResponse or node.websocket.WebSocket: receive, send_str, close
        transport: asyncio.Transport,
        settings: Settings,
        remote: str | None,
    ) -> None:
        self.id = connection_id
        self.identity = identity
        self.ws = ws
        self.transport = transport
        self.remote = remote
        self.subscriptions: dict[Pattern, Subscription] = {}
        self.bus_names: tuple[str, ...] = ()  # the bus channels its identity holds (user channel, push:admin)
        self._loop = asyncio.get_running_loop()
        self.bucket = push_bucket(settings.events_per_second, settings.events_burst, self._loop.time())
        self._settings = settings
        self.queue: EventQueue | None = None  # exists only while events wait: idle connections stay small
        self._drainer: asyncio.Task[None] | None = None
        self._stall_seconds = settings.slow_consumer_seconds
        self._lagged_interval = settings.lagged_interval
        self._lagged: dict[str, int] = {}
        self._lagged_timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.direct = True  # nothing waits and not closing: the hub may write to the socket itself
        self.close_code: int | None = None  # what the node closed with, if it closed first
        self.close_reason = ""
        self.heard = True  # a frame came from the client since the last heartbeat round (node.heartbeat)
        self.pinged = False  # a ping went out in the last round and nothing came since
        self.nagle = False  # the kernel coalesces small frames (PUSH_TCP_NODELAY off): p0 and replies are pushed
        self.caught_up_rounds = 0  # backlog-watch rounds caught up while coalescing (node.backlog)
        self.widest_window = 0  # the widest receive window the client advertised (node.backlog)
        # Delta frames (node.deltas): the patterns that asked for them (None: none, the hub's one check)
        # and, per delta channel, the version last written there: the only base a delta may use
        # (at most MAX_DELTA_BASES channels).
        self.delta_patterns: set[Pattern] | None = None
        self.delta_last: dict[str, Version] = {}

    # --- identity -------------------------------------------------------------

    @property
    def user_id(self) -> str | None:
        return self.identity.user_id

    # --- delta frames ------------------------------------------------------------------

    def set_delta(self, pattern: Pattern, delta: bool) -> None:
        """Note whether ``pattern`` asked for delta frames. Any change forgets every base: a client
        resubscribing (after a corrupt delta, say) starts each chain again from a full event."""
        patterns = self.delta_patterns or set()
        if delta == (pattern in patterns):
            return
        if delta:
            patterns.add(pattern)
        else:
            patterns.discard(pattern)
        self.delta_patterns = patterns or None
        self.delta_last.clear()

    def delta_frame(self, event: DeltaEvent) -> bytes:
        """The frame of a delta channel's event, chosen as it is written: a delta only on top of the
        version written last on this channel, else the full event, which starts the chain again."""
        last = self.delta_last
        frame = event.frame_after(last.get(event.channel))
        if event.channel not in last and len(last) >= MAX_DELTA_BASES:
            del last[next(iter(last))]  # bounded: the oldest entry goes; its channel starts again with a full event
        last[event.channel] = event.key
        return frame

    # --- outbound: the hot path ---------------------------------------------------

    def offer(
        self,
        frame: bytes,
        rank: int,
        expires_at: int | None,
        conflate_channel: str | None,
        bucket: TokenBucket | None,
        timestamp: int,
        delta: DeltaEvent | None = None,
    ) -> bool:
        """Send or queue one event frame; True if it was written to the socket now.

        With ``delta`` (a delta channel's event), ``frame`` only sizes the queue: what is written
        is chosen at write time (:meth:`delta_frame`).
        """
        if self.closing:
            return False
        if self._drainer is None and self.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
            now = self._loop.time()
            if (bucket is None or bucket.wait_time(now) == 0.0) and self.bucket.take(now):
                if bucket is not None:
                    bucket.take(now)
                self.transport.write(frame if delta is None else self.delta_frame(delta))
                if rank == 0 and self.nagle:
                    self.push_now()
                return True
        try:
            if self.queue is None:
                self.queue = EventQueue(self._settings.queue_size, self._settings.write_buffer_bytes, self._report_drop)
            self.queue.push(QueuedEvent(frame, rank, expires_at, conflate_channel, bucket, timestamp, delta), now_ms())
        except SlowConsumer:
            self.close_slow_consumer("p0 events do not fit in the queue")
            return False
        if self._drainer is None:
            self.direct = False
            self._drainer = self._loop.create_task(self._drain())
        return False

    def hold(self, subscription: Subscription, event: HeldEvent) -> None:
        """Keep a live event aside while its subscription replays history (bounded by the queue size)."""
        assert subscription.held is not None
        if len(subscription.held) < self._settings.queue_size:
            subscription.held.append(event)
        else:
            self._report_drop("recovery_overflow", 1)

    async def _drain(self) -> None:
        """Write queued events as push tokens and the socket allow; exits when empty."""
        queue = self.queue
        assert queue is not None
        try:
            while queue.count and not self.closing:
                if not await self._wait_writable():
                    return
                now = self._loop.time()
                wait = self.bucket.wait_time(now)
                head = queue.peek()
                if head is not None and head.bucket is not None:
                    wait = max(wait, head.bucket.wait_time(now))
                if wait > 0:
                    # Waking for every single token would cost a task switch per event;
                    # a short floor sends a few per wake-up with the same average rate.
                    await asyncio.sleep(max(wait, MIN_DRAIN_SLEEP_SECONDS))
                    continue
                self._write_batch(queue, now)
        finally:
            self._drainer = None
            self.direct = not self.closing and not queue.count
            if not queue.count:
                self.queue = None

    def _write_batch(self, queue: EventQueue, now: float) -> None:
        """Write every queued frame the limits allow now, in one call."""
        expired = queue.pop_expired(now_ms())
        if expired:
            self._report_drop("expired", expired)
        frames: list[bytes] = []
        oldest_timestamp = 0
        while queue.count:
            head = queue.peek()
            assert head is not None
            if head.expires_at is not None and head.expires_at < now_ms():
                queue.pop()
                self._report_drop("expired", 1)
                continue
            if self.bucket.wait_time(now) > 0 or (head.bucket is not None and head.bucket.wait_time(now) > 0):
                break
            self.bucket.take(now)
            if head.bucket is not None:
                head.bucket.take(now)
            queue.pop()
            if not frames:
                oldest_timestamp = head.timestamp
            frames.append(head.frame if head.delta is None else self.delta_frame(head.delta))
        if frames:
            self.transport.writelines(frames)
            if self.nagle:
                # Paced writes go out as paced: a client timing arrivals against its push
                # limit must not see a held batch land together with the next one.
                self.push_now()
            EVENTS_DELIVERED.inc(len(frames))
            observe_latency(oldest_timestamp)

    async def _wait_writable(self) -> bool:
        """Wait until the socket drains below the high-water mark; False if it stalls.

        The node's own WebSocket says when its transport drains (``resume_writing``):
        the writer sleeps until then instead of polling every 20 ms.
        """
        wait_writable = getattr(self.ws, "wait_writable", None)
        started = self._loop.time()
        while self.transport.get_write_buffer_size() >= WRITE_HIGH_WATER:
            if self.transport.is_closing():
                return False
            waited = self._loop.time() - started
            if waited >= self._stall_seconds:
                self.close_slow_consumer("socket not draining")
                return False
            if wait_writable is None or not await wait_writable(self._stall_seconds - waited):
                await asyncio.sleep(STALL_POLL_SECONDS)
        return True

    # --- drops and lagged notices -------------------------------------------------

    def _report_drop(self, reason: str, n: int) -> None:
        count_drop(reason, n)
        self._lagged[reason] = self._lagged.get(reason, 0) + n
        if self._lagged_timer is None and not self.closing:
            self._lagged_timer = self._loop.call_later(self._lagged_interval, self._send_lagged)

    def _send_lagged(self) -> None:
        self._lagged_timer = None
        if self.closing or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() >= WRITE_HIGH_WATER:
            self._lagged_timer = self._loop.call_later(self._lagged_interval, self._send_lagged)
            return  # counts keep adding up until the client reads again
        notices, self._lagged = self._lagged, {}
        for reason, dropped in notices.items():
            self.send_control(protocol.lagged(dropped, reason))

    # --- heartbeat ------------------------------------------------------------------

    def heartbeat(self) -> None:
        """One heartbeat round: a client heard from since the last round is left alone, a quiet
        one gets a ping, one that stayed quiet after its ping is dropped (as aiohttp's heartbeat:
        only connections silent for a whole interval see pings)."""
        transport = self.transport
        if self.closing or transport.is_closing():
            return
        if self.heard:
            self.heard = self.pinged = False
        elif self.pinged:
            self.closing, self.direct = True, False
            self.close_reason = "no pong within the heartbeat interval"
            transport.abort()
        else:
            self.pinged = True
            transport.write(PING_FRAME)

    def pong(self, payload: bytes) -> None:
        """Answer a client's ping (RFC 6455 §5.5.3), unless the socket is backed up or closing."""
        if not self.transport.is_closing() and self.transport.get_write_buffer_size() < WRITE_HIGH_WATER:
            self.transport.write(control_frame(0x8A, payload[:125]))
            if self.nagle:
                self.push_now()

    # --- control messages and closing -------------------------------------------------

    def send_control(self, message: str) -> None:
        """Send a protocol message (ack, error, pong, lagged): not rate-limited, not queued, not delayed."""
        if not self.transport.is_closing():
            self.transport.write(text_frame(message.encode()))
            if self.nagle:
                self.push_now()

    # --- coalescing small frames in the kernel (PUSH_TCP_NODELAY false, or auto while behind) ----

    def coalesce(self) -> None:
        """Let the kernel hold small frames while earlier ones are unacknowledged (Nagle; PUSH_TCP_NODELAY=false).

        Under fan-out most of a node's CPU is one ``write`` per delivery, and with
        TCP_NODELAY each of those sends a segment (on loopback it also runs the
        receiver's TCP). With Nagle a write to a connection whose previous frame is
        not acknowledged yet only appends to the socket's queue; the kernel sends
        them together when the ACK comes (as Nchan's subscriber sockets do). The
        latency this adds is bounded by the client's ACK: p0 events, replies and the
        writer's paced batches (events that waited for the push limit or a backed-up
        socket) are pushed at once (:meth:`push_now`).
        """
        if self._set_nodelay(0):
            self._count_nagle(True)
            self.caught_up_rounds = 0

    def send_at_once(self) -> None:
        """Back to one segment per frame (TCP_NODELAY, which also sends what the kernel holds)."""
        self._set_nodelay(1)
        self._count_nagle(False)

    def push_now(self) -> None:
        """Send what the kernel holds for this socket now (setting TCP_NODELAY flushes it)."""
        self._set_nodelay(1, 0)

    def _set_nodelay(self, *values: int) -> bool:
        """Set TCP_NODELAY to each of ``values`` in turn; False if there is no socket or it is closing."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            for value in values:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, value)
        except OSError:
            return False
        return True

    def _count_nagle(self, nagle: bool) -> None:
        """Note whether the kernel coalesces this connection's frames (``ws_coalescing_connections``)."""
        if nagle != self.nagle:
            COALESCING_CONNECTIONS.inc(1 if nagle else -1)
            self.nagle = nagle

    def close_slow_consumer(self, reason: str) -> None:
        self.close_soon(protocol.CloseCode.SLOW_CONSUMER, f"slow consumer: {reason}", drop_reason="slow_consumer")

    def close_soon(self, code: int, reason: str, drop_reason: str | None = None) -> None:
        """Close from a synchronous context (the hot path): drops what waits, then closes."""
        if self.closing:
            return
        self.closing = True
        self.direct = False
        if drop_reason and self.queue is not None and self.queue.count:
            count_drop(drop_reason, self.queue.count)
        self.queue = None
        self._loop.create_task(self.close(code, reason))

    async def send_elsewhere(self, reason: str) -> None:
        """Send this client back through the router (drain, rebalance): ``reconnect``, then close 1012."""
        self.send_control(protocol.reconnect(reason))
        await self.close(protocol.CloseCode.RECONNECT, reason)

    async def close(self, code: int, reason: str) -> None:
        self.closing = True
        self.direct = False
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if self._lagged_timer is not None:
            self._lagged_timer.cancel()
            self._lagged_timer = None
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]), CLOSE_TIMEOUT_SECONDS)
        except (TimeoutError, ConnectionError, RuntimeError):
            # The peer is gone or not reading: a graceful close would keep its buffered
            # bytes (and the socket) forever, so drop them.
            self.transport.abort()

    def release(self) -> None:
        """Forget everything this connection holds (it has disconnected)."""
        self.closing = True
        self.direct = False
        self.queue = None
        self._count_nagle(False)
        if self._lagged_timer is not None:
            self._lagged_timer.cancel()
        if self._drainer is not None:
            self._drainer.cancel()


def observe_latency(timestamp_ms: int) -> None:
    EVENT_CONSUME_LATENCY.observe(max(0.0, (now_ms() - timestamp_ms) / 1000.0))
