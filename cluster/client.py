"""``PushClient``: an asyncio client that does not lose events (SPEC §4, §8).

    async with PushClient("ws://127.0.0.1:8080/ws", token=my_token) as client:
        client.subscribe(["order.*"], on_order)
        await client.wait_closed()

It connects through the router (or straight to a node), subscribes with one
handler per pattern, and on any disconnect — a crash, ``reconnect`` + 1012 from
a draining node, a network error — reconnects with exponential backoff and full
jitter, then resubscribes with the last cursor of each subscription so the node
replays what was missed. An event reaches the handler of every subscription whose
patterns match it, once each (as in the browser client: ``order.*`` and
``order.filled`` both see an ``order.filled``). Events are deduplicated by id (a bounded window), the
token is refreshed before expiry through a callback, and ``lagged`` and
``recovered: false`` are surfaced to the application through callbacks. On state
channels (``market.ticker``, ``market.orderbook``) events carry a per-channel ``seq``;
a jump (updates conflated or lost) is reported through ``on_gap(channel, expected,
got)`` and the subscription is renewed, so the node sends the latest value again.
A subscription may ask for Fossil deltas (``delta="fossil"``, docs/DELTA.md): the client
keeps the last envelope bytes per channel and rebuilds each envelope from them, so
handlers see the same events as on a full subscription; a delta it cannot apply
(unknown base, corrupt) is not delivered, and is handled like a gap — never a wrong book.

Handlers run one at a time in arrival order; while a handler runs the client
does not read the socket, so a slow handler slows the node's sends to this
connection (and the node's own limits apply) instead of growing memory here.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from cluster import fossil, protocol
from cluster.backoff import Backoff
from cluster.channels import ChannelError, Pattern, parse_channel, parse_pattern
from cluster.envelope import MAX_ENVELOPE_BYTES, PRIORITY_RANK

Handler = Callable[[dict[str, Any]], Awaitable[None] | None]
TokenSource = Callable[[], Awaitable[str] | str]

DEDUP_WINDOW = 10_000
DEFAULT_PRIORITY = "p2"  # an envelope without priority (SPEC §2)
REFRESH_BEFORE_SECONDS = 30.0
FATAL_CLOSE_CODES = {4001, 4003, 4029}  # retrying cannot help without a new token or fewer connections


@dataclass
class ClientSubscription:
    patterns: list[str]
    handler: Handler
    priority: str | None = None
    limit: float | None = None
    snapshot: bool | None = None  # None: the node's default (the latest value of state channels after the ack)
    delta: str | None = None  # "fossil": state channels' events as deltas (docs/DELTA.md)
    cursor: str | None = None  # the last event (or ack position) seen on this subscription
    request_id: str = ""
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    parsed: list[Pattern] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parsed = [parse_pattern(p) for p in self.patterns]
        if self.delta is not None and self.delta not in protocol.DELTA_FORMATS:
            raise ValueError(f"delta must be one of {protocol.DELTA_FORMATS}, not {self.delta!r}")

    def admits(self, envelope: dict[str, Any] | None) -> bool:
        """Whether the event's priority is within this subscription's ``priority`` (absent: p2)."""
        if self.priority is None:
            return True
        priority = (envelope or {}).get("priority") or DEFAULT_PRIORITY
        return PRIORITY_RANK.get(priority, PRIORITY_RANK[DEFAULT_PRIORITY]) <= PRIORITY_RANK[self.priority]

    def matches(self, channel_name: str) -> bool:
        try:
            channel = parse_channel(channel_name)
        except ChannelError:
            return False
        return any(p.matches(channel) for p in self.parsed)


class PushClient:
    """One resilient connection to a delta-push cluster."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        on_lagged: Callable[[dict[str, Any]], Any] | None = None,
        on_unrecovered: Callable[[list[str]], Any] | None = None,
        on_state: Callable[[str], Any] | None = None,
        on_error: Callable[[dict[str, Any]], Any] | None = None,
        on_ack: Callable[[dict[str, Any]], Any] | None = None,
        on_gap: Callable[[str, int, int], Any] | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        fail_fast: bool = False,
    ) -> None:
        self.url = url
        self._token = token
        self._get_token = get_token
        self._on_lagged = on_lagged
        self._on_unrecovered = on_unrecovered
        self._on_state = on_state
        self._on_error = on_error
        self._ack_callback = on_ack
        self._on_gap = on_gap
        self._last_seq: dict[str, int] = {}  # state channel -> seq of the last event seen on this connection
        # delta channel -> (seq, envelope bytes) of its last event: the base of the next delta
        self._bases: dict[str, tuple[int | None, bytes]] = {}
        # channel -> id of the resubscribe it waits for after an unusable delta (later deltas are dropped quietly)
        self._resyncing: dict[str, str] = {}
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.fail_fast = fail_fast  # give up if the very first connect fails (CLI use)
        self.failure: str | None = None
        self.subscriptions: list[ClientSubscription] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._ids = itertools.count(1)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.state = "idle"
        self.welcome: dict[str, Any] | None = None
        self.connected = asyncio.Event()
        self.connects = 0
        self.close_codes: list[int | None] = []
        self.fatal: int | None = None
        self._background: set[asyncio.Future[Any]] = set()

    # --- public API -------------------------------------------------------------------

    async def start(self) -> PushClient:
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aenter__(self) -> PushClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def subscribe(
        self,
        patterns: list[str],
        handler: Handler,
        *,
        priority: str | None = None,
        limit: float | None = None,
        snapshot: bool | None = None,
        delta: str | None = None,
    ) -> ClientSubscription:
        """Subscribe now (if connected) and after every reconnect.

        Without ``snapshot``, the node's default (on): state channels' latest values right after the ack;
        ``snapshot=False``: none for this subscription. ``delta="fossil"``: the
        node may send state channels' events as deltas; handlers still get whole envelopes.
        """
        subscription = ClientSubscription(list(patterns), handler, priority, limit, snapshot, delta)
        self.subscriptions.append(subscription)
        if self._ws is not None and not self._ws.closed:
            self._spawn(self._send_subscribe(subscription))
        return subscription

    async def unsubscribe(self, subscription: ClientSubscription) -> None:
        self.subscriptions.remove(subscription)
        if self._ws is not None and not self._ws.closed:
            await self._send(protocol.unsubscribe_request(subscription.patterns, self._next_id()))

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Close cleanly (1000) and stop reconnecting."""
        self._closing = True
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._set_state("closed")

    # --- connection loop ----------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(self.min_backoff * 2, self.max_backoff)
        while not self._closing:
            self._set_state("connecting")
            try:
                await self._connect_once()
                backoff.reset()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.close_codes.append(None)
                self._set_state(f"error: {type(exc).__name__}")
                if self.fail_fast and self.connects == 0:
                    self.failure = str(exc) or type(exc).__name__
                    break
            if self._closing or self.fatal is not None:
                break
            await backoff.wait()  # full jitter: a whole fleet reconnecting at once spreads out over the window
        self._set_state("closed")

    async def _connect_once(self) -> None:
        assert self._session is not None
        token = await self._current_token()
        params = {"token": token} if token else None
        self._ws = await self._session.ws_connect(
            self.url, params=params, heartbeat=30, timeout=aiohttp.ClientWSTimeout(ws_close=5)
        )
        self.connected.clear()
        refresher: asyncio.Task[None] | None = None
        try:
            async for msg in self._ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                try:
                    message = protocol.parse_server_message(msg.data)
                except protocol.ProtocolError:
                    continue  # not ours to act on (a broken proxy); the node's next frame is
                if isinstance(message, protocol.Event):
                    await self._on_event(message)
                elif isinstance(message, protocol.Welcome):
                    self.welcome = message.doc
                    self._last_seq.clear()  # the replays and snapshots of the resubscribe set new baselines
                    self._bases.clear()  # a new connection starts every delta chain with a full event
                    self._resyncing.clear()
                    self.connects += 1
                    self._set_state("connected")
                    self.connected.set()
                    for subscription in self.subscriptions:
                        await self._send_subscribe(subscription)
                    if self._get_token is not None and message.expires_at:
                        refresher = asyncio.create_task(self._refresh_loop(message.expires_at))
                elif isinstance(message, protocol.Ack):
                    self._on_ack(message)
                elif isinstance(message, protocol.Lagged) and self._on_lagged is not None:
                    await _call(self._on_lagged, message.doc)
                elif isinstance(message, protocol.ErrorMessage) and self._on_error is not None:
                    await _call(self._on_error, message.doc)
                elif isinstance(message, protocol.Authenticated) and refresher is not None and message.expires_at:
                    refresher.cancel()
                    refresher = asyncio.create_task(self._refresh_loop(message.expires_at))
                elif isinstance(message, protocol.Reconnect):
                    self._set_state("reconnecting")
        finally:
            if refresher is not None:
                refresher.cancel()
            code = self._ws.close_code
            self.close_codes.append(code)
            if code in FATAL_CLOSE_CODES and not (code == 4001 and self._get_token is not None):
                self.fatal = code
            self.connected.clear()

    async def _current_token(self) -> str | None:
        if self._get_token is not None:
            self._token = await _call(self._get_token)
        return self._token

    async def _refresh_loop(self, expires_at_ms: int) -> None:
        remaining = max(0.0, expires_at_ms / 1000 - time.time())
        await asyncio.sleep(remaining - min(REFRESH_BEFORE_SECONDS, remaining / 2))
        token = await self._current_token()
        if token:
            await self._send(protocol.auth_request(token))

    # --- subscriptions and events ---------------------------------------------------------

    def _next_id(self) -> str:
        return f"c{next(self._ids)}"

    async def _send(self, frame: str) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_str(frame)

    async def _send_subscribe(self, subscription: ClientSubscription) -> None:
        await self._send(self._subscribe_frame(subscription))

    def _subscribe_frame(self, subscription: ClientSubscription, resync: bool = False) -> str:
        """The subscribe message for ``subscription``, under a new request id (set now, before it is sent).

        ``resync``: after a gap, ask for the latest values unless the subscription refused them.
        """
        subscription.request_id = self._next_id()
        subscription.acked.clear()
        return protocol.subscribe_request(
            subscription.patterns,
            subscription.request_id,
            priority=subscription.priority,
            limit=subscription.limit or None,
            since=subscription.cursor,
            snapshot=True if resync and subscription.snapshot is not False else subscription.snapshot,
            delta=subscription.delta,
        )

    def _on_ack(self, ack: protocol.Ack) -> None:
        lost = ack.unrecovered
        for channel in [c for c, request_id in self._resyncing.items() if request_id == ack.id]:
            del self._resyncing[channel]  # what follows the ack is the fresh snapshot (or a full live event)
        for subscription in self.subscriptions:
            if subscription.request_id != ack.id:
                continue
            if lost and self._on_unrecovered is not None:
                self._spawn(_call(self._on_unrecovered, lost))
            if subscription.cursor is None or lost:
                subscription.cursor = ack.cursor or subscription.cursor
            subscription.acked.set()
        if self._ack_callback is not None:
            self._spawn(_call(self._ack_callback, ack.doc))

    async def _on_event(self, event: protocol.Event) -> None:
        """Every subscription whose patterns match and whose priority admits it gets the event, once each
        (the browser client's rule)."""
        targets = [s for s in self.subscriptions if s.matches(event.channel)]
        doc, envelope = event.doc, event.data
        if event.text is not None:  # a delta channel: data is the envelope's text or a delta from the last one
            envelope = self._rebuild(event, targets)
            if envelope is None:
                return
            doc = {key: envelope if key == "data" else value for key, value in doc.items() if key != "delta"}
        for subscription in targets:
            subscription.cursor = event.cursor or subscription.cursor
        if event.seq is not None:
            self._check_sequence(event.channel, event.seq, targets)
        event_id = envelope.get("id") if envelope else None
        if event_id in self._seen:
            return
        self._seen[event_id] = None
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        for subscription in targets:
            if subscription.admits(envelope):
                await _call(subscription.handler, doc)

    def _rebuild(self, event: protocol.Event, targets: list[ClientSubscription]) -> dict[str, Any] | None:
        """The envelope of a delta channel's event, or None when it cannot be trusted.

        A full event replaces the channel's base; a delta is applied only to the base of ``seq - 1``,
        and Fossil's length and checksum checks refuse a corrupt one. Anything else — no base, another
        seq, a corrupt delta — is not delivered: the base is forgotten and the channel resubscribed
        (reported as a gap), so the application never sees a book built on the wrong bytes.
        """
        channel, seq, text = event.channel, event.seq, event.text
        assert text is not None
        base = self._bases.pop(channel, None)
        try:
            if not event.delta:
                raw = text.encode()
            elif base is None or seq is None or base[0] is None or base[0] != seq - 1:
                raise fossil.FossilError("the delta's base is not the last event received on this channel")
            else:
                raw = fossil.decode(base[1], text.encode(), max_size=MAX_ENVELOPE_BYTES)
            envelope = orjson.loads(raw)
            if not isinstance(envelope, dict):
                raise ValueError("the envelope is not a JSON object")
        except ValueError:  # FossilError, JSONDecodeError, UnicodeEncodeError (a lone surrogate) are ValueErrors
            if channel not in self._resyncing:  # else: still in flight before the resubscribe, dropped quietly
                last = self._last_seq.get(channel)
                got = seq if seq is not None else 0
                self._gap(channel, last + 1 if last is not None else got, got, targets)
            return None
        self._bases[channel] = (seq, raw)
        if not event.delta:
            self._resyncing.pop(channel, None)  # a full event: the chain starts again here
        return envelope

    def _check_sequence(self, channel: str, seq: int, targets: list[ClientSubscription]) -> None:
        """A state channel's seq must grow by one; a jump means missed updates (conflated, dropped,
        lost on the bus): the state is stale, so tell the application and resubscribe for a fresh
        snapshot (the node sends the latest value right after the ack)."""
        last = self._last_seq.get(channel)
        if last is None or seq == last + 1:
            self._last_seq[channel] = seq
            return
        if seq <= last:
            return  # a replayed or repeated event: nothing newer was missed
        self._gap(channel, last + 1, seq, targets)

    def _gap(self, channel: str, expected: int, got: int, targets: list[ClientSubscription]) -> None:
        """Tell the application and renew the channel's subscriptions, without ``since``: the node then
        sends the channel's latest value (a full event) right after the ack."""
        self._last_seq.pop(channel, None)  # the snapshot after the resubscribe sets the next baseline
        if self._on_gap is not None:
            self._spawn(_call(self._on_gap, channel, expected, got))
        if not targets:
            return
        frames = [protocol.unsubscribe_request(sorted({p for s in targets for p in s.patterns}), self._next_id())]
        for subscription in targets:
            subscription.cursor = None  # a fresh snapshot, not a replay of what was skipped
            frames.append(self._subscribe_frame(subscription, resync=True))
        self._resyncing[channel] = targets[-1].request_id
        self._spawn(self._send_all(frames))

    async def _send_all(self, frames: list[str]) -> None:
        for frame in frames:
            await self._send(frame)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        """Run a callback or send in the background, keeping a reference until it ends."""
        future = asyncio.ensure_future(awaitable)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_state is not None:
                result = self._on_state(state)
                if inspect.isawaitable(result):
                    self._spawn(result)


async def _call(function: Callable[..., Any], *args: Any) -> Any:
    result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
