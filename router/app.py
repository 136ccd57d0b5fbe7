"""A router (SPEC §7): the stateless front door that maps users onto push nodes.

Serves ``/ws`` (the WebSocket proxy of :mod:`router.proxy`), ``/v1/route``
(``{"node","url"}`` for clients that connect straight to a node),
``/v1/cluster`` (admin token: nodes, connections, ring share, health),
``/healthz``, ``/readyz`` (a usable ring: at least one node, Redis or not) and
``/metrics``. It keeps no state of its own beyond its live view of the
membership (:mod:`cluster.membership`) and per-IP rate buckets, so any number
of routers can stand behind an L4 load balancer. On SIGTERM it stops accepting
and sends its proxied clients ``reconnect`` + 1012 spread over the drain window.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from cluster.auth import AuthError
from cluster.handshake import authenticate, token_from_request
from cluster.logs import configure, log
from cluster.membership import Membership, NodeInfo
from cluster.metrics import AUTH_FAILURES, ROUTER_ROUTES
from cluster.process import add_metrics_route, run_process, run_with_app, serve_app
from cluster.protocol import ErrorCode
from cluster.ring import routing_key
from cluster.settings import Settings
from router.proxy import websocket_handler
from router.state import ROUTER_STATE, RouterState
from router.static import WEB_ROOT, add_static_routes

PROBE_TIMEOUT_SECONDS = 1.0


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status, headers=headers or None)


async def route(request: web.Request) -> web.Response:
    """``{"node","url"}``: where this client should connect (token optional, node rules).

    Not counted against the per-IP connection limit: a lookup opens no connection
    and costs one token check and one hash, and the connection it leads to is
    made to a node, which the router cannot limit anyway.
    """
    state: RouterState = request.app[ROUTER_STATE]
    settings = state.settings
    try:
        identity = authenticate(state.verifier, token_from_request(request), settings.allow_anonymous)
    except AuthError as exc:
        AUTH_FAILURES.labels(exc.reason).inc()
        return _error(401, exc.code, exc.message)
    info = state.owner(routing_key(identity))
    if info is None:
        return _error(503, ErrorCode.INTERNAL, "no push node is available")
    ROUTER_ROUTES.labels(info.id).inc()
    return web.json_response({"node": info.id, "url": info.url})


async def cluster_view(request: web.Request) -> web.Response:
    """The cluster as this router sees it (admin token required)."""
    state: RouterState = request.app[ROUTER_STATE]
    token = token_from_request(request)
    if token is None:
        return _error(401, ErrorCode.UNAUTHORIZED, "an admin token is required")
    try:
        identity = authenticate(state.verifier, token, allow_anonymous=False)
    except AuthError as exc:
        AUTH_FAILURES.labels(exc.reason).inc()
        return _error(401, exc.code, exc.message)
    if not identity.is_admin:
        return _error(403, ErrorCode.FORBIDDEN, "the admin role is required")
    membership = state.membership
    nodes = sorted(membership.nodes.values(), key=lambda n: n.id)
    shares = membership.ring.shares()
    ready = await asyncio.gather(*(_probe(state, node) for node in nodes))
    proxied: dict[str, int] = {}
    for relay in state.relays:
        proxied[relay.node_id] = proxied.get(relay.node_id, 0) + 1
    healthy_age_ms = 3 * membership.heartbeat_seconds * 1000
    body = {
        "nodes": [
            {
                "id": node.id,
                "url": node.url,
                "internalUrl": node.internal_url,
                "connections": node.connections,
                "share": round(shares.get(node.id, 0.0), 4),
                "ready": is_ready,
                "healthy": is_ready and membership.now_ms - node.updated_at <= healthy_age_ms,
                "heartbeatAgeMs": max(0, membership.now_ms - node.updated_at),
                "startedAt": node.started_at,
                "proxied": proxied.get(node.id, 0),
                "verifier": node.verifier,
            }
            for node, is_ready in zip(nodes, ready, strict=True)
        ],
        "connections": sum(node.connections for node in nodes),
        "redis": membership.connected,
        "router": {"proxied": len(state.relays), "draining": state.draining},
    }
    return web.json_response(body)


async def _probe(state: RouterState, node: NodeInfo) -> bool:
    try:
        async with state.session.get(
            node.internal_url + "/readyz", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)
        ) as response:
            return response.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "role": "router"})


async def readyz(request: web.Request) -> web.Response:
    """200 while the router holds a usable ring and is not draining; Redis is reported, not required."""
    state: RouterState = request.app[ROUTER_STATE]
    ready = state.ready
    body = {
        "status": "ready" if ready else "not ready",
        "role": "router",
        "redis": state.membership.connected,
        "nodes": len(state.membership.ring),
        "draining": state.draining,
    }
    return web.json_response(body, status=200 if ready else 503)


def create_app(settings: Settings, membership: Membership | None = None) -> web.Application:
    app = web.Application()
    state = RouterState(settings, membership)
    app[ROUTER_STATE] = state
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/v1/route", route)
    app.router.add_get("/v1/cluster", cluster_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_metrics_route(app, settings)
    # the live event page (/) and the browser client (/web/)
    add_static_routes(app, Path(settings.web_root) if settings.web_root else WEB_ROOT)

    run_with_app(app, state)
    return app


async def serve(settings: Settings, stop: asyncio.Event | None = None, membership: Membership | None = None) -> None:
    """Run a router until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and exit."""
    app = create_app(settings, membership)
    state = app[ROUTER_STATE]

    def started() -> None:
        log("router_started", port=settings.port, membership="redis" if state.owns_membership else "memory")

    await serve_app(app, settings, stop, started=started, drain=state.drain)
    log("router_stopped", port=settings.port)


def run(settings: Settings) -> None:
    """The ``pushctl router`` process: exits 1 with one line when it cannot listen."""
    configure(settings.log_level)
    run_process("router", serve(settings))
