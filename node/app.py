"""A push node: the aiohttp application, its background tasks, and running it.

Serves ``/ws`` (see :mod:`node.endpoint`; the node's own upgrade, :mod:`node.front`), ``/healthz`` (the process is alive),
``/readyz`` (subscribed to the bus and not draining) and ``/metrics``. On
SIGTERM/SIGINT it stops accepting, tells every client to ``reconnect`` spread
over the drain window (close 1012), then exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from cluster.broker import Broker, MemoryBroker, RedisBroker
from cluster.broker_cluster import ClusterBroker
from cluster.logs import configure, log
from cluster.membership import Membership
from cluster.process import StartupError, add_metrics_route, run_process, run_with_app, serve_app
from cluster.redis_url import is_cluster_url
from cluster.settings import Settings
from node.endpoint import upgrade, websocket_handler
from node.front import front_factory
from node.state import NODE_STATE, NodeState


async def healthz(request: web.Request) -> web.Response:
    state: NodeState = request.app[NODE_STATE]
    return web.json_response({"status": "ok", "node": state.node_id})


async def readyz(request: web.Request) -> web.Response:
    state: NodeState = request.app[NODE_STATE]
    ready = state.broker.ready.is_set() and not state.draining
    body = {
        "status": "ready" if ready else "not ready",
        "node": state.node_id,
        "bus": state.broker.ready.is_set(),
        "draining": state.draining,
        "connections": len(state.hub.connections),
    }
    return web.json_response(body, status=200 if ready else 503)


def create_app(
    settings: Settings, broker: Broker | None = None, membership: Membership | None = None
) -> web.Application:
    app = web.Application(client_max_size=settings.max_frame_bytes)
    if broker is None:
        broker_class = ClusterBroker if is_cluster_url(settings.redis_url) else RedisBroker
        broker = broker_class(
            settings.redis_url, linger_seconds=settings.bus_linger_seconds, name=settings.effective_node_id
        )
    state = NodeState(settings, broker, membership)
    app[NODE_STATE] = state
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_metrics_route(app, settings)

    run_with_app(app, state)
    return app


async def serve(
    settings: Settings,
    broker: Broker | None = None,
    stop: asyncio.Event | None = None,
    membership: Membership | None = None,
) -> None:
    """Run a node until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and exit."""
    app = create_app(settings, broker, membership)
    state = app[NODE_STATE]
    if stop is not None:
        state.stopping = stop  # servers sharing one process stop together, a refused node included

    def started() -> None:
        bus = "memory" if isinstance(state.broker, MemoryBroker) else "redis"
        log("node_started", node=state.node_id, port=settings.port, url=settings.effective_public_url, bus=bus)

    def front(http: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        return front_factory(http, lambda *upgraded: upgrade(state, *upgraded))

    await serve_app(app, settings, state.stopping, started=started, drain=state.drain, front=front)
    if state.failure is not None:
        raise StartupError(state.failure)
    log("node_stopped", node=state.node_id)


def run(settings: Settings) -> None:
    """The ``pushctl node`` process: exits 1 with one line when it cannot start or join."""
    configure(settings.log_level)
    run_process("node", serve(settings))
