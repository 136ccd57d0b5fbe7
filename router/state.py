"""What one router holds: its membership view, token verifier, per-IP buckets and live relays."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from cluster.auth import TokenVerifier
from cluster.logs import log
from cluster.membership import Membership, NodeInfo, RedisMembership
from cluster.metrics import ROUTER_NODES, ROUTER_PROXIED_CONNECTIONS, ROUTER_REDIS_CONNECTED, ROUTER_ROUTES
from cluster.pacing import paced
from cluster.ring import Ring
from cluster.settings import Settings
from router.admission import ConnectionRateLimiter
from router.relay import Relay


class RouterState:
    """Everything one router holds; shared by its request handlers."""

    def __init__(self, settings: Settings, membership: Membership | None = None) -> None:
        self.settings = settings
        self.owns_membership = membership is None
        self.membership = membership or RedisMembership.from_url(
            settings.redis_url, settings.heartbeat_seconds, settings.node_ttl_seconds
        )
        self.membership.on_ring_change(self._ring_changed)
        ROUTER_NODES.set(len(self.membership.ring))
        ROUTER_REDIS_CONNECTED.set_function(lambda: 1.0 if self.membership.connected else 0.0)
        self.verifier = TokenVerifier(settings)
        self.limiter = ConnectionRateLimiter(settings.router_ip_rate, settings.router_ip_burst)
        self.relays: set[Relay] = set()
        self.draining = False
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "router not started"
        return self._session

    def _ring_changed(self, old: Ring, new: Ring) -> None:
        ROUTER_NODES.set(len(new))
        for node_id in old.node_ids - new.node_ids:
            self.forget_series(node_id)

    def forget_series(self, node_id: str) -> None:
        """Drop a departed node's labelled series, so rollouts do not pile up series for the router's lifetime.

        The proxied-connections gauge stays while relays to that node are still
        open (a draining node closes them over its window); the last one to end
        calls this again.
        """
        if node_id in self.membership.ring.node_ids:
            return  # it came back
        ROUTER_ROUTES.remove(node_id)
        if not any(relay.node_id == node_id for relay in self.relays):
            ROUTER_PROXIED_CONNECTIONS.remove(node_id)

    @property
    def ready(self) -> bool:
        """Whether the load balancer should send clients here: a usable ring and not draining.

        Redis is not required: while it is away the router keeps routing on the
        last ring it read (see :mod:`cluster.membership`), so a Redis blip must
        not take every router out of the load balancer at once. Redis health is
        the ``router_redis_connected`` metric and its alert instead.
        """
        return len(self.membership.ring) > 0 and not self.draining

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, connect=3.0, sock_connect=2.0),
            auto_decompress=False,
        )
        if self.owns_membership:
            self._tasks.append(asyncio.create_task(self.membership.watch(), name="membership"))

    async def drain(self) -> None:
        """Stop accepting and send every proxied client back through the load balancer, paced."""
        self.draining = True
        relays = list(self.relays)
        log("router_drain", connections=len(relays), seconds=self.settings.drain_seconds)
        await paced(relays, self.settings.drain_seconds, lambda relay: relay.reconnect("router is shutting down"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self.owns_membership:
            await self.membership.close()

    def owner(self, key: str) -> NodeInfo | None:
        node_id = self.membership.ring.node_for(key)
        return None if node_id is None else self.membership.nodes.get(node_id)


ROUTER_STATE = web.AppKey("router", RouterState)
