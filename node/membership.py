"""This node's place in the cluster membership (SPEC §7).

The node joins when its bus subscription is ready (before ``/readyz`` says so,
so a ready node is routable), heartbeats its connection count every
``heartbeat_seconds``, re-joins after a Redis outage, and withdraws first thing
when it starts draining so routers stop sending it clients at once. It also
watches the membership so the :class:`~node.rebalance.Rebalancer` can move the
connections a scale-out assigns to another node.

Before its first join the node reads the live list and refuses to join (the
process exits 1 with one line) when its id is already heartbeating there — two
processes with one id would overwrite each other's record — or when the live
nodes accept other tokens than it does (``PUSH_JWT_MATCH_CLUSTER``). A record
of its id at its own address, or one that stops changing, is a crashed
predecessor's, and is taken over.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine, Protocol

from redis.exceptions import RedisError

from cluster.auth import NO_KEYS, TokenVerifier
from cluster.broker import BUS_ERRORS, Broker, RedisBroker
from cluster.clock import now_ms
from cluster.logs import RateLimitedLog, log
from cluster.membership import (
    MEMBERSHIP_ERRORS,
    Membership,
    MemoryMembership,
    NodeInfo,
    RedisMembership,
    checkpoint,
)
from cluster.settings import Settings
from node.hub import Hub
from node.rebalance import Rebalancer

WITHDRAW_TIMEOUT_SECONDS = 2.0
HELD_ID_HEARTBEATS = 3
"""Heartbeat periods a node watches a record of its own id: unchanged means its holder is dead."""


def membership_for(broker: Broker, settings: Settings) -> Membership:
    """Membership on the node's own Redis, or in memory for a single in-process node."""
    if isinstance(broker, RedisBroker):
        return RedisMembership(broker.client, settings.heartbeat_seconds, settings.node_ttl_seconds)
    return MemoryMembership(settings.heartbeat_seconds, settings.node_ttl_seconds)


class PresenceHost(Protocol):
    """What presence needs of the node (node.state.NodeState): named here, so neither imports the other."""

    settings: Settings
    node_id: str
    broker: Broker
    hub: Hub
    verifier: TokenVerifier

    def fail(self, reason: str) -> None: ...


class NodePresence:
    """Registers this node, keeps its lease alive, and takes it out of the ring on drain."""

    def __init__(self, state: PresenceHost, membership: Membership | None = None) -> None:
        settings = state.settings
        self.state = state
        self.membership = membership or membership_for(state.broker, settings)
        self.started_at = now_ms()
        self.registered = False
        self.admitted = False
        self.leaving = False
        self._lock = asyncio.Lock()  # a heartbeat in flight must not land after the withdrawal
        self._log_failure = RateLimitedLog(per_second=0.2, burst=1)
        self.rebalancer = Rebalancer(state.node_id, state.hub, self.membership, settings.rebalance_per_second)
        self.membership.on_ring_change(self.rebalancer.on_ring_change)

    def info(self) -> NodeInfo:
        settings = self.state.settings
        return NodeInfo(
            id=self.state.node_id,
            url=settings.effective_public_url,
            internal_url=settings.effective_internal_url,
            connections=len(self.state.hub.connections),
            started_at=self.started_at,
            verifier=self.state.verifier.fingerprint,
        )

    async def join(self) -> None:
        """Register (and announce) this node; raises a bus error if Redis is not there."""
        if not self.admitted:
            refusal = await self.admission()
            if refusal is not None:
                self.state.fail(refusal)
                return
            self.admitted = True
        async with self._lock:
            if self.leaving:
                return
            self.registered = True  # from now on heartbeats keep the lease, and re-join after any loss
            try:
                await self.membership.announce(self.info(), join=True)
            except BUS_ERRORS:
                raise  # the bus reconnects and calls join again
            except RedisError as exc:
                log("join_failed", logging.WARNING, node=self.state.node_id, reason=type(exc).__name__)
                return
        log("node_registered", node=self.state.node_id, url=self.state.settings.effective_public_url)

    async def admission(self) -> str | None:
        """Why this node must not join the live cluster (its id is live, its keys differ), or None."""
        node_id = self.state.node_id
        await self.membership.refresh()
        holder = self.membership.nodes.get(node_id)
        # A holder at our own address is our crashed predecessor: we hold its port now.
        if holder is not None and holder.internal_url != self.state.settings.effective_internal_url:
            seconds = HELD_ID_HEARTBEATS * self.membership.heartbeat_seconds
            log("node_id_held", logging.WARNING, node=node_id, url=holder.url, seconds=seconds)
            await asyncio.sleep(seconds)
            await self.membership.refresh()
            now = self.membership.nodes.get(node_id)
            if now is not None and now.updated_at != holder.updated_at:
                return (
                    f"node id {node_id!r} is already live in this cluster (at {now.url}); "
                    "pick another --node-id, or another Redis (--redis-url / REDIS_URL)"
                )
        mine = self.state.verifier.fingerprint
        others = sorted(n.id for n in self.membership.nodes.values() if n.id != node_id and n.verifier not in ("", mine))
        if not others:
            return None
        listed = ", ".join(others[:3]) + (" …" if len(others) > 3 else "")
        theirs = self.membership.nodes[others[0]].verifier
        keyless_among_keyed = mine == NO_KEYS and theirs != NO_KEYS
        if not keyless_among_keyed and not self.state.settings.jwt_match_cluster:
            # Different keys are said loudly but do not stop the node by default: a rolling key
            # change, or several deployments sharing one Redis on purpose, must still start.
            log("jwt_keys_differ", logging.WARNING, node=node_id, mine=mine, theirs=theirs, nodes=listed)
            return None
        mine_text = "no PUSH_JWT_SECRET or PUSH_JWT_PUBLIC_KEY" if mine == NO_KEYS else f"JWT fingerprint {mine}"
        theirs_text = "no JWT keys" if theirs == NO_KEYS else f"JWT fingerprint {theirs}"
        return (
            f"this node has {mine_text} but the live nodes {listed} have {theirs_text}: it would refuse their users' "
            "tokens; give it the same PUSH_JWT_SECRET / PUSH_JWT_PUBLIC_KEY (and audience, issuer), or another Redis"
        )

    def start(self) -> list[Coroutine[Any, Any, None]]:
        """The background work: heartbeats, and following the membership."""
        return [self._heartbeat(), self.membership.watch()]

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.membership.heartbeat_seconds)
            async with self._lock:
                if self.leaving or not self.registered:
                    continue
                try:
                    await self.membership.announce(self.info())
                except MEMBERSHIP_ERRORS as exc:
                    self._log_failure(
                        "heartbeat_failed", logging.WARNING, node=self.state.node_id, reason=type(exc).__name__
                    )
            checkpoint()

    async def leave(self) -> None:
        """Leave the ring now; if Redis cannot be told, the lease runs out on its own."""
        self.rebalancer.stop()
        async with self._lock:
            self.leaving = True
            if not self.registered:
                return
            try:
                await asyncio.wait_for(self.membership.withdraw(self.state.node_id), WITHDRAW_TIMEOUT_SECONDS)
            except (TimeoutError, *MEMBERSHIP_ERRORS) as exc:
                log("withdraw_failed", logging.WARNING, node=self.state.node_id, reason=type(exc).__name__)
                return
        log("node_withdrawn", node=self.state.node_id)
