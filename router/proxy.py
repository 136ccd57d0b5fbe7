"""The router's ``/ws``: admit a client, pick its node on the ring, relay frames both ways.

Admission uses the node's own rules and codes (SPEC §4–§5, the functions of
:mod:`cluster.handshake`), after the upgrade so browsers can see why: per-IP rate
(RATE_LIMITED, 1008), Origin (4003), token (4001). Then the owning node of the
token's ``sub`` (a random key for anonymous clients) is dialled with the
client's query string, ``Authorization`` and ``Origin``, and its IP in
``X-Forwarded-For``; if that node cannot be reached the next node on the ring
is tried once. The node verifies the token again — it never trusts the router.

After the upgrade, frames are relayed as they are: the payload bytes of each
frame from one side are written as one frame to the other (``decode_text=False``
on both sides, so nothing is decoded, parsed or re-encoded). Close codes and
reasons pass through both ways; a node that disappears without a close frame
(crash, SIGKILL) becomes ``{"action":"reconnect"}`` and close 1012, so the
client comes back through the router to the next owner. Backpressure is end to
end: a slow client stops the relay reading from the node, and the node applies
its slow-consumer policy (4008), which then passes through.
"""

from __future__ import annotations

import asyncio
import logging
from itertools import islice

import aiohttp
from aiohttp import web

from cluster.auth import AuthError
from cluster.handshake import authenticate, origin_allowed, reject, send_elsewhere, token_from_request
from cluster.logs import RateLimitedLog, log
from cluster.metrics import (
    AUTH_FAILURES,
    CONNECTIONS_REJECTED,
    ROUTER_PROXIED_CONNECTIONS,
    ROUTER_PROXY_ERRORS,
    ROUTER_ROUTES,
    WS_CONNECTIONS,
)
from cluster.protocol import CloseCode, ErrorCode
from cluster.ring import routing_key
from router.admission import client_ip
from router.relay import Relay
from router.state import ROUTER_STATE, RouterState

CONNECT_ATTEMPTS = 2  # the owner, then the next node on the ring
CLOSE_TIMEOUT_SECONDS = 2.0
FORWARDED_HEADERS = ("Authorization", "Origin", "User-Agent")

_log_rejected = RateLimitedLog(per_second=5)
_log_proxy_error = RateLimitedLog(per_second=5)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[ROUTER_STATE]
    settings = state.settings
    ip = client_ip(request, settings)

    if state.draining:
        ws = await _accept(request, state)
        CONNECTIONS_REJECTED.labels("draining").inc()
        await send_elsewhere(ws, "router is stopping")
        return ws
    if not state.limiter.allow(ip, asyncio.get_running_loop().time()):
        _log_rejected("connection_rejected", logging.WARNING, reason="rate_limited", remote=ip)
        ws = await _accept(request, state)
        await reject(
            ws,
            ErrorCode.RATE_LIMITED,
            f"more than {settings.router_ip_rate:g} new connections per second from this address",
            CloseCode.FLOODING,
            "rate_limited",
        )
        return ws
    if not origin_allowed(settings, request):
        ws = await _accept(request, state)
        await reject(ws, ErrorCode.FORBIDDEN, "origin not allowed", CloseCode.FORBIDDEN, "origin")
        return ws
    try:
        identity = authenticate(state.verifier, token_from_request(request), settings.allow_anonymous)
    except AuthError as exc:
        AUTH_FAILURES.labels(exc.reason).inc()
        _log_rejected("auth_failure", logging.WARNING, reason=exc.reason, remote=ip)
        ws = await _accept(request, state)
        await reject(ws, exc.code, exc.message, CloseCode.UNAUTHORIZED, "unauthorized")
        return ws

    upstream, node_id = await _dial(state, routing_key(identity), request, ip)
    if upstream is None or node_id is None:
        ws = await _accept(request, state)
        await reject(ws, ErrorCode.INTERNAL, "no push node is available", CloseCode.INTERNAL, "no_node")
        return ws
    try:
        ws = await _accept(request, state, upstream.protocol)
    except BaseException:
        await upstream.close(code=1001, message=b"client went away")
        raise
    relay = Relay(ws, upstream, node_id)
    state.relays.add(relay)
    ROUTER_ROUTES.labels(node_id).inc()
    ROUTER_PROXIED_CONNECTIONS.labels(node_id).inc()
    WS_CONNECTIONS.inc()
    log("proxy_connect", node=node_id, user=identity.user_id, remote=ip)
    try:
        await relay.run()
    finally:
        state.relays.discard(relay)
        ROUTER_PROXIED_CONNECTIONS.labels(node_id).dec()
        if node_id not in state.membership.ring.node_ids:
            state.forget_series(node_id)
        WS_CONNECTIONS.dec()
        log("proxy_disconnect", node=node_id, user=identity.user_id, reason=relay.reason, code=relay.code)
    return ws


async def _accept(request: web.Request, state: RouterState, protocol_name: str | None = None) -> web.WebSocketResponse:
    settings = state.settings
    ws = web.WebSocketResponse(
        protocols=(protocol_name,) if protocol_name else (),
        heartbeat=settings.ws_heartbeat or None,
        max_msg_size=settings.max_frame_bytes * 4,  # the node answers oversized frames itself (1009)
        compress=False,
        decode_text=False,
        timeout=CLOSE_TIMEOUT_SECONDS,
    )
    await ws.prepare(request)
    return ws


async def _dial(
    state: RouterState, key: str, request: web.Request, ip: str
) -> tuple[aiohttp.ClientWebSocketResponse | None, str | None]:
    """Open the WebSocket to the key's owner (or the next node on the ring if it is unreachable)."""
    headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
    headers["X-Forwarded-For"] = ip
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    membership = state.membership
    for node_id in islice(membership.ring.candidates(key), CONNECT_ATTEMPTS):
        info = membership.nodes.get(node_id)
        if info is None:
            continue
        url = _ws_url(info.internal_url)
        try:
            upstream = await state.session.ws_connect(
                url,
                params=request.query,
                headers=headers,
                protocols=offered,
                autoping=True,
                heartbeat=None,  # the node pings; aiohttp answers for us
                max_msg_size=0,  # the node bounds what it sends
                compress=0,
                decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_SECONDS),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ROUTER_PROXY_ERRORS.labels("connect").inc()
            _log_proxy_error("proxy_connect_failed", logging.WARNING, node=node_id, reason=type(exc).__name__)
            continue
        return upstream, node_id
    if not membership.ring:
        ROUTER_PROXY_ERRORS.labels("no_node").inc()
    return None, None


def _ws_url(internal_url: str) -> str:
    base = internal_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + "/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + "/ws"
    return base + "/ws"
