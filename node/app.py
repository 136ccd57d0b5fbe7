"""A push node: the aiohttp application, its background tasks, and running it.

Serves ``/ws`` (see :mod:`node.endpoint`; the node's own upgrade, :mod:`node.front`), ``/healthz`` (the process is alive),
``/readyz`` (subscribed to the bus and not draining) and ``/metrics``. On
SIGTERM/SIGINT it stops accepting, tells every client to ``reconnect`` spread
over the drain window (close 1012), then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from cluster import protocol
from cluster.auth import AuthError, TokenVerifier
from cluster.broker import BUS_ERRORS, Broker, MemoryBroker, RedisBroker
from cluster.broker_cluster import ClusterBroker
from cluster.history import History
from cluster.logs import configure, log
from cluster.membership import Membership
from cluster.process import StartupError, add_metrics_route, run_process, run_with_app, serve_app
from cluster.redis_url import is_cluster_url
from cluster.settings import Settings
from cluster.slots import ConnectionSlots
from cluster.state import LatestValues
from node.endpoint import NODE_STATE, upgrade, websocket_handler
from node.front import front_factory
from node.heartbeat import run_heartbeat
from node.hub import Hub
from node.membership import NodePresence
from node.recovery import Recovery

DRAIN_CONCURRENCY = 100
EPOCH_REFRESH_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 2.0


class NodeState:
    """Everything one node holds; shared by its request handlers."""

    def __init__(self, settings: Settings, broker: Broker, membership: Membership | None = None) -> None:
        self.settings = settings
        self.node_id = settings.effective_node_id
        self.broker = broker
        self.verifier = TokenVerifier(settings)
        self.hub = Hub(self.node_id, settings.public_domains, settings.max_envelope_bytes, broker)
        client = broker.client if isinstance(broker, RedisBroker) else None
        self.slots = ConnectionSlots(client, settings.max_connections_per_user, settings.connection_lease_seconds)
        self.draining = False
        cluster = isinstance(broker, ClusterBroker)
        history = History(client, settings.history_size, cluster=cluster) if client is not None else None
        latest = (
            LatestValues(client, settings.state_types, settings.snapshot_max_channels, cluster=cluster)
            if client is not None
            else None
        )
        self.recovery = Recovery(self.hub, history, settings.max_envelope_bytes, latest)
        self.bus_position: str | None = None  # history position while the bus was last up
        self._bus_was_up = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopping = asyncio.Event()  # serve() waits on it: set to stop this process
        self.failure: str | None = None
        self.presence = NodePresence(self, membership)

    def fail(self, reason: str) -> None:
        """Stop this process with ``reason`` as its one-line error (it must not stay up)."""
        log("node_refused", logging.ERROR, node=self.node_id, reason=reason)
        self.failure = reason
        self.stopping.set()

    async def on_bus_ready(self) -> None:
        self.hub.epoch = self.broker.epoch
        if self._bus_was_up:
            caught_up = await self.recovery.catch_up(self.bus_position, list(self.hub.connections.values()))
            log("bus_catch_up", node=self.node_id, events=caught_up)
        self._bus_was_up = True
        self.bus_position = await self.recovery.position() or self.bus_position
        with contextlib.suppress(*BUS_ERRORS):
            await self.slots.renew_all()
        await self.presence.join()  # before the bus is ready: a ready node is routable

    async def start(self) -> None:
        if not self.verifier.configured:
            if not self.settings.allow_anonymous:
                raise StartupError(
                    "neither PUSH_JWT_SECRET nor PUSH_JWT_PUBLIC_KEY is set and PUSH_ALLOW_ANONYMOUS is off: "
                    "this node would refuse every client"
                )
            log(
                "node_without_keys",
                logging.WARNING,
                node=self.node_id,
                reason="neither PUSH_JWT_SECRET nor PUSH_JWT_PUBLIC_KEY is set: every token is refused, "
                "anonymous clients only; this node joins only a cluster of such nodes",
            )
        with contextlib.suppress(AuthError):
            self.verifier.warm_up()
        self.broker.on_ready = self.on_bus_ready
        self._tasks.append(asyncio.create_task(self.broker.run(self.hub.on_bus_message), name="bus"))
        self._tasks.append(asyncio.create_task(self._renew_slots(), name="slots"))
        if self.settings.ws_heartbeat:
            self._tasks.append(
                asyncio.create_task(run_heartbeat(self.hub, self.settings.ws_heartbeat), name="ws-heartbeat")
            )
        self._tasks.append(asyncio.create_task(self._follow_history(), name="history"))
        self._tasks.extend(asyncio.create_task(work) for work in self.presence.start())

    async def _follow_history(self) -> None:
        """Follow the history epoch (a flushed Redis gets a new one without a reconnect) and
        remember the history position, from which a bus catch-up starts after an outage."""
        if not isinstance(self.broker, RedisBroker):
            return
        while True:
            await asyncio.sleep(EPOCH_REFRESH_SECONDS)
            if not self.broker.ready.is_set():
                continue
            with contextlib.suppress(*BUS_ERRORS):
                self.hub.epoch = await self.broker.load_epoch()
                self.bus_position = await self.recovery.position() or self.bus_position

    async def _renew_slots(self) -> None:
        while True:
            await asyncio.sleep(self.slots.renew_interval)
            try:
                await self.slots.renew_all()
            except BUS_ERRORS as exc:
                log("slot_renewal_failed", logging.WARNING, node=self.node_id, reason=type(exc).__name__)

    async def drain(self) -> None:
        """Leave the ring, stop accepting, send every client ``reconnect`` + 1012 spread over the window."""
        await self.presence.leave()
        self.draining = True
        connections = list(self.hub.connections.values())
        log("drain", node=self.node_id, connections=len(connections), seconds=self.settings.drain_seconds)
        if not connections:
            return
        pause = self.settings.drain_seconds / len(connections)
        gate = asyncio.Semaphore(DRAIN_CONCURRENCY)

        async def move(conn: Any) -> None:
            async with gate:
                conn.send_control(protocol.reconnect("node is shutting down"))
                await conn.close(protocol.CloseCode.RECONNECT, "node is shutting down")

        moving = []
        for conn in connections:
            moving.append(asyncio.create_task(move(conn)))
            await asyncio.sleep(pause)
        await asyncio.gather(*moving, return_exceptions=True)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Bounded: on Python 3.11 a cancel that lands as a redis-py write completes can be
        # swallowed, and a loop would then never stop; the process must exit anyway.
        await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECONDS)
        with contextlib.suppress(*BUS_ERRORS):
            await asyncio.wait_for(self.broker.close(), STOP_TIMEOUT_SECONDS)


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
