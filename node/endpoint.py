"""The node's ``/ws`` endpoint: admit a client, then serve its protocol messages.

Admission (SPEC §4–§6) happens after the upgrade so that browsers can see why
they were refused: Origin allow-list (4003), token (4001), draining (1012),
cluster-wide connection cap (4029). Then ``welcome``, and one message at a
time through :func:`cluster.protocol.parse_client_message`. Every bad frame
gets an ``error`` and the connection keeps serving; floods (1008), oversized
frames (1009) and expired tokens (4001) close it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from aiohttp import WSMsgType, web

from cluster import protocol
from cluster.auth import AuthError
from cluster.channels import ChannelError, parse_pattern
from cluster.envelope import PRIORITIES
from cluster.handshake import UpgradeRequest, authenticate, origin_allowed, reject, send_elsewhere, token_from_request
from cluster.limits import TokenBucket
from cluster.logs import log
from cluster.metrics import AUTH_FAILURES, CONNECTIONS_REJECTED, PROTOCOL_ERRORS, WS_CONNECTIONS
from cluster.protocol import CloseCode, ErrorCode, ProtocolError
from node.connection import WRITE_HIGH_WATER, ClientConnection, Subscription, push_bucket
from node.deltas import may_match_state
from node.state import NODE_STATE, NodeState
from node.websocket import WebSocket
from node.wshandshake import RequestHead

LOWEST_RANK = len(PRIORITIES) - 1  # p3
BUS_SETTLE_SECONDS = 2.0  # longest a subscribe waits for Redis to confirm its bus subscriptions
_CLIENT_TASKS: set[asyncio.Task[None]] = set()  # the serving task of each upgraded client, kept referenced


async def turn_away(ws: Any) -> None:
    """A draining node turns new clients away: ``reconnect``, then close 1012."""
    CONNECTIONS_REJECTED.labels("draining").inc()
    await send_elsewhere(ws, "node is draining")


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """``/ws`` through aiohttp: an upgrade that came on a keep-alive connection after another request."""
    state = request.app[NODE_STATE]
    ws = web.WebSocketResponse(
        heartbeat=None,  # one node-wide task pings every connection (node.heartbeat)
        autoping=False,  # pings and pongs reach Session.serve: any frame proves the client alive
        max_msg_size=state.settings.max_frame_bytes * 4,
        compress=False,
        decode_text=False,
        timeout=2.0,
    )
    await ws.prepare(request)
    assert request.transport is not None
    await serve_client(state, request, ws, request.transport)
    return ws


def upgrade(state: NodeState, transport: asyncio.Transport, request: RequestHead, response: bytes, rest: bytes) -> None:
    """Take over a connection whose first request is a valid ``/ws`` upgrade (:mod:`node.front`)."""
    ws = WebSocket(transport, state.settings.max_frame_bytes * 4, WRITE_HIGH_WATER)
    transport.set_protocol(ws)
    transport.write(response)
    peer = transport.get_extra_info("peername")
    request.remote = peer[0] if peer else None
    if rest:
        ws.data_received(rest)
    task = asyncio.get_running_loop().create_task(serve_client(state, request, ws, transport))
    _CLIENT_TASKS.add(task)
    task.add_done_callback(lambda done: _client_done(done, ws))


def _client_done(task: asyncio.Task[None], ws: WebSocket) -> None:
    _CLIENT_TASKS.discard(task)
    ws.finish()  # close the socket if the close handshake did not
    if not task.cancelled() and (exc := task.exception()) is not None:
        # aiohttp logged a failing handler; nothing else would see this one.
        log("client_error", logging.ERROR, reason=type(exc).__name__, detail=str(exc)[:200])


async def serve_client(state: NodeState, request: UpgradeRequest, ws: Any, transport: asyncio.Transport) -> None:
    """Admit an upgraded client (after the upgrade, so browsers see why not), then serve it until it leaves.

    ``ws`` is the node's own :class:`~node.websocket.WebSocket` or aiohttp's
    ``WebSocketResponse``; ``request`` is dropped once admitted, so the request
    head is not kept for the connection's lifetime.
    """
    settings = state.settings
    remote = request.remote
    forwarded_for = request.headers.get("X-Forwarded-For", "").split(",")[0].strip() or None  # logged, not trusted

    if not origin_allowed(settings, request):
        await reject(ws, ErrorCode.FORBIDDEN, "origin not allowed", CloseCode.FORBIDDEN, "origin")
        return
    if state.draining:
        await turn_away(ws)
        return
    token = token_from_request(request)
    del request
    try:
        identity = authenticate(state.verifier, token, settings.allow_anonymous)
    except AuthError as exc:
        AUTH_FAILURES.labels(exc.reason).inc()
        log("auth_failure", logging.WARNING, node=state.node_id, reason=exc.reason, remote=remote)
        await reject(ws, exc.code, exc.message, CloseCode.UNAUTHORIZED, "unauthorized")
        return
    del token

    connection_id = secrets.token_hex(8)
    if identity.user_id is not None and not await state.slots.acquire(identity.user_id, connection_id):
        log(
            "connection_rejected",
            logging.WARNING,
            node=state.node_id,
            user=identity.user_id,
            reason="too_many_connections",
        )
        await reject(
            ws,
            ErrorCode.TOO_MANY_CONNECTIONS,
            f"at most {settings.max_connections_per_user} connections per user",
            CloseCode.TOO_MANY_CONNECTIONS,
            "too_many_connections",
        )
        return

    if state.draining:  # the drain began while the slot was being taken: it did not see us
        if identity.user_id is not None:
            await state.slots.release(identity.user_id, connection_id)
        await turn_away(ws)
        return
    conn = ClientConnection(connection_id, identity, ws, transport, settings, remote)
    state.hub.add(conn)
    WS_CONNECTIONS.inc()
    log(
        "connect",
        node=state.node_id,
        connection=conn.id,
        user=identity.user_id,
        remote=remote,
        forwarded_for=forwarded_for,
    )
    session = Session(state, conn)
    reason = "client closed"
    try:
        await ws.send_str(
            protocol.welcome(conn.id, state.node_id, identity.user_id, identity.expires_at, settings.public_limits())
        )
        if settings.tcp_nodelay == "false":
            conn.coalesce()  # after the handshake and the welcome, which go out at once
        reason = await session.serve()
    except (ConnectionError, asyncio.CancelledError):
        reason = "connection lost"
        raise
    finally:
        session.stop()
        state.hub.remove(conn)
        conn.release()
        WS_CONNECTIONS.dec()
        if conn.user_id is not None:
            await state.slots.release(conn.user_id, conn.id)
        log(
            "disconnect",
            node=state.node_id,
            connection=conn.id,
            user=conn.user_id,
            reason=reason,
            code=conn.close_code or ws.close_code,
        )


class Session:
    """Serves one admitted connection's inbound messages."""

    __slots__ = ("state", "conn", "inbound", "_expiry")

    def __init__(self, state: NodeState, conn: ClientConnection) -> None:
        self.state = state
        self.conn = conn
        settings = state.settings
        loop = asyncio.get_running_loop()
        self.inbound = TokenBucket(settings.inbound_per_second, settings.inbound_per_second, loop.time())
        self._expiry: asyncio.TimerHandle | None = None
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        expires_at = self.conn.identity.expires_at
        if expires_at is not None:
            delay = max(0.0, expires_at / 1000 - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        AUTH_FAILURES.labels("expired").inc()
        log(
            "auth_failure",
            logging.WARNING,
            node=self.state.node_id,
            connection=self.conn.id,
            user=self.conn.user_id,
            reason="expired",
        )
        self._error(ErrorCode.TOKEN_EXPIRED, "token expired; send auth with a fresh token before expiresAt")
        self.conn.close_soon(CloseCode.UNAUTHORIZED, "token expired")

    def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()

    def _error(
        self, code: str, message: str, request_id: protocol.RequestId = None, channels: list[str] | None = None
    ) -> None:
        PROTOCOL_ERRORS.labels(code).inc()
        self.conn.send_control(protocol.error(code, message, request_id, channels))

    async def serve(self) -> str:
        """Read until the client leaves or must be closed; returns why."""
        ws, conn = self.conn.ws, self.conn
        max_frame = self.state.settings.max_frame_bytes
        loop = asyncio.get_running_loop()
        while True:
            msg = await ws.receive()  # aiohttp's WSMessage or cluster.wsframes.Message: the same type values
            conn.heard = True
            if msg.type == WSMsgType.PONG:
                continue
            if msg.type == WSMsgType.PING:
                conn.pong(msg.data)
                continue
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return conn.close_reason or "client closed"
            if msg.type == WSMsgType.ERROR:
                return f"protocol error: {msg.extra or msg.data}"
            if conn.closing:
                continue
            if not self.inbound.take(loop.time()):
                CONNECTIONS_REJECTED.labels("flooding").inc()
                self._error(
                    ErrorCode.RATE_LIMITED, f"more than {self.state.settings.inbound_per_second:g} messages per second"
                )
                await conn.close(CloseCode.FLOODING, "flooding")
                return "flooding"
            if msg.type != WSMsgType.TEXT:
                self._error(ErrorCode.INVALID_MESSAGE, "only text frames carrying JSON are accepted")
                continue
            if len(msg.data) > max_frame:
                self._error(ErrorCode.INVALID_MESSAGE, f"frame exceeds {max_frame} bytes")
                await conn.close(CloseCode.TOO_BIG, "frame too big")
                return "frame too big"
            try:
                message = protocol.parse_client_message(msg.data)
            except ProtocolError as exc:
                self._error(exc.code, exc.message, exc.request_id)
                continue
            await self.handle(message)

    async def handle(self, message: protocol.ClientMessage) -> None:
        if isinstance(message, protocol.Subscribe):
            await self.subscribe(message)
        elif isinstance(message, protocol.Unsubscribe):
            self.unsubscribe(message)
        elif isinstance(message, protocol.Auth):
            await self.refresh(message)
        else:
            self.conn.send_control(protocol.pong(message.id))

    async def subscribe(self, message: protocol.Subscribe) -> None:
        conn, hub, settings = self.conn, self.state.hub, self.state.settings
        invalid: list[str] = []
        forbidden: list[str] = []
        over_limit: list[str] = []
        bad_delta: list[str] = []
        subscribed: list[str] = []
        added: list[tuple[str, Subscription]] = []
        max_rank = LOWEST_RANK if message.priority is None else message.priority
        for text in message.channels:
            try:
                pattern = parse_pattern(text)
            except ChannelError:
                invalid.append(text)
                continue
            if not hub.may_subscribe(conn, pattern):
                forbidden.append(text)
                continue
            if message.invalid_delta and may_match_state(pattern, settings.state_types):
                bad_delta.append(text)  # a malformed delta request refuses what it applies to, only that
                continue
            is_new = pattern not in conn.subscriptions
            if is_new and len(conn.subscriptions) >= settings.max_subscriptions:
                over_limit.append(text)
                continue
            bucket = None
            if message.limit is not None and message.limit < settings.events_per_second:
                burst = max(1.0, min(float(settings.events_burst), message.limit))
                bucket = push_bucket(message.limit, burst, asyncio.get_running_loop().time())
            subscription = Subscription(pattern, max_rank, bucket, delta=message.delta is not None)
            if is_new:
                # Live events wait until the ack is out (and history replayed): the client
                # sees the ack first, then every event published after it, none twice.
                subscription.held = []
                added.append((text, subscription))
            else:
                subscription.held = conn.subscriptions[pattern].held
            hub.subscribe(conn, subscription)
            subscribed.append(text)
        if subscribed:
            replays: dict = {}
            snapshots: dict = {}
            try:
                replays, snapshots = await self._acknowledge(message, subscribed, added)
            finally:
                # Whatever happened, held subscriptions go live: a subscription left holding
                # would silently never deliver again.
                if added:
                    self.state.recovery.resume(conn, [s for _, s in added], replays, snapshots)
            log("subscribe", node=self.state.node_id, connection=conn.id, user=conn.user_id, channels=subscribed)
        if invalid:
            self._error(ErrorCode.INVALID_CHANNEL, "invalid channel pattern", message.id, invalid)
        if bad_delta:
            self._error(ErrorCode.INVALID_MESSAGE, protocol.INVALID_DELTA_MESSAGE, message.id, bad_delta)
        if forbidden:
            self._error(ErrorCode.FORBIDDEN, "a token is required for private channels", message.id, forbidden)
        if over_limit:
            self._error(
                ErrorCode.SUBSCRIPTION_LIMIT,
                f"at most {settings.max_subscriptions} subscriptions per connection",
                message.id,
                over_limit,
            )

    async def _acknowledge(
        self, message: protocol.Subscribe, subscribed: list[str], added: list[tuple[str, Subscription]]
    ) -> tuple[dict, dict]:
        """Send the ack once the new subscriptions' events are on their way; returns history to replay
        and the latest values of the state channels the new subscriptions match (SPEC-silent, README)."""
        hub, conn = self.state.hub, self.conn
        recovered = None
        replays: dict = {}
        if added:
            # The ack promises every event published after it: Redis must have
            # confirmed the bus subscriptions this subscribe created first.
            await self.state.broker.settled(hub.bus_names(conn), BUS_SETTLE_SECONDS)
        if message.since is not None:
            replays = await self.state.recovery.fetch(message.since, [s.pattern for _, s in added])
            new_ones = {text: s.pattern for text, s in added}
            recovered = {
                text: (replays[new_ones[text]].recovered if new_ones[text] in replays else False)
                if text in new_ones
                else True  # already live on this connection: nothing was missed
                for text in subscribed
            }
        snapshots: dict = {}
        snapshot = self.state.settings.snapshot_by_default if message.snapshot is None else message.snapshot
        if added and snapshot:  # a recovered subscription gets its history instead
            wanted = {s.pattern: text for text, s in added if not (recovered and recovered.get(text))}
            snapshots = await self.state.recovery.snapshots(list(wanted))
        position = await self.state.recovery.position()
        conn.send_control(protocol.ack(message.id, subscribed=subscribed, recovered=recovered, cursor=position))
        for pattern, snapshot in snapshots.items():
            if snapshot.left_out:
                limit = self.state.settings.snapshot_max_channels
                self._error(
                    ErrorCode.SNAPSHOT_LIMIT,
                    f"latest values of {limit} channels sent, {snapshot.left_out} more left out",
                    message.id,
                    [wanted[pattern]],
                )
        return replays, snapshots

    def unsubscribe(self, message: protocol.Unsubscribe) -> None:
        removed: list[str] = []
        invalid: list[str] = []
        for text in message.channels:
            try:
                pattern = parse_pattern(text)
            except ChannelError:
                invalid.append(text)
                continue
            self.state.hub.unsubscribe(self.conn, pattern)
            removed.append(text)
        if removed:
            self.conn.send_control(protocol.ack(message.id, unsubscribed=removed))
            log(
                "unsubscribe",
                node=self.state.node_id,
                connection=self.conn.id,
                user=self.conn.user_id,
                channels=removed,
            )
        if invalid:
            self._error(ErrorCode.INVALID_CHANNEL, "invalid channel pattern", message.id, invalid)

    async def refresh(self, message: protocol.Auth) -> None:
        """Token refresh: same ``sub`` required; an anonymous connection may log in."""
        conn = self.conn
        try:
            identity = authenticate(self.state.verifier, message.token, allow_anonymous=False)
        except AuthError as exc:
            AUTH_FAILURES.labels(exc.reason).inc()
            log(
                "auth_failure",
                logging.WARNING,
                node=self.state.node_id,
                connection=conn.id,
                user=conn.user_id,
                reason=exc.reason,
            )
            self._error(exc.code, exc.message, message.id)
            return
        if conn.user_id is not None and identity.user_id != conn.user_id:
            AUTH_FAILURES.labels("sub_mismatch").inc()
            log(
                "auth_failure",
                logging.WARNING,
                node=self.state.node_id,
                connection=conn.id,
                user=conn.user_id,
                reason="sub_mismatch",
            )
            self._error(ErrorCode.UNAUTHORIZED, "a refreshed token must have the same sub", message.id)
            return
        logging_in = conn.user_id is None and identity.user_id is not None
        if logging_in and not await self.state.slots.acquire(identity.user_id, conn.id):
            CONNECTIONS_REJECTED.labels("too_many_connections").inc()
            self._error(ErrorCode.TOO_MANY_CONNECTIONS, "this user has too many connections", message.id)
            conn.close_soon(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
            return
        self.state.hub.reidentify(conn, identity)
        self._arm_expiry()
        assert identity.user_id is not None and identity.expires_at is not None
        conn.send_control(protocol.authenticated(identity.user_id, identity.expires_at, message.id))
