"""What one push node holds (its hub, bus, history, caps, presence) and its background work.

Request handlers reach it through ``request.app[NODE_STATE]``; it lives here, beside
its key, so that the endpoint and the app both import it and nothing imports the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from cluster.auth import AuthError, TokenVerifier
from cluster.broker import BUS_ERRORS, Broker, RedisBroker
from cluster.broker_cluster import ClusterBroker
from cluster.history import History
from cluster.logs import log
from cluster.membership import Membership
from cluster.pacing import paced
from cluster.process import StartupError
from cluster.settings import Settings
from cluster.slots import ConnectionSlots
from cluster.state import LatestValues
from node.backlog import run_backlog_watch
from node.heartbeat import run_heartbeat
from node.hub import Hub
from node.membership import NodePresence
from node.recovery import Recovery

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
        if self.settings.tcp_nodelay == "auto":
            self._tasks.append(asyncio.create_task(run_backlog_watch(self.hub), name="backlog-watch"))
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
        await paced(connections, self.settings.drain_seconds, lambda conn: conn.send_elsewhere("node is shutting down"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Bounded: on Python 3.11 a cancel that lands as a redis-py write completes can be
        # swallowed, and a loop would then never stop; the process must exit anyway.
        await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECONDS)
        with contextlib.suppress(*BUS_ERRORS):
            await asyncio.wait_for(self.broker.close(), STOP_TIMEOUT_SECONDS)


NODE_STATE: web.AppKey[NodeState] = web.AppKey("node_state")
