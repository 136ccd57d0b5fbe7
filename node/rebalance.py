"""Scale-out rebalancing (SPEC §7): hand users over to a node that just joined.

When the ring gains a node, the users of this node that now hash to it are
moved: each of their connections gets ``{"action":"reconnect"}`` and close 1012,
and the client comes back through the router to its new owner. Moves are
paced so a scale-out never causes a reconnect storm: the misplaced connections
are spread evenly, with jitter, over ``1 / rebalance_per_second`` seconds (with
the default 0.05, 5 % of them per second over 20 s). Ownership is checked again
right before each move, so a node that leaves again meanwhile moves no one.

Only users this node owned before the change are moved. Only scale-out moves anyone: when a node leaves, its users reconnect by
themselves and users of the other nodes keep their owner. Anonymous
connections are never moved (their ring key is random).
"""

from __future__ import annotations

import asyncio
import random

from cluster.logs import log
from cluster.membership import Membership
from cluster.ring import Ring
from node.connection import ClientConnection
from node.hub import Hub

MOVE_CONCURRENCY = 50
REASON = "rebalance: your user now belongs to another node"


class Rebalancer:
    """Moves this node's connections whose user hashes to a newly added node, a bounded share per second."""

    def __init__(self, node_id: str, hub: Hub, membership: Membership, share_per_second: float) -> None:
        self.node_id = node_id
        self.hub = hub
        self.membership = membership
        self.window = 1.0 / share_per_second if share_per_second > 0 else 0.0
        self.pending: dict[str, ClientConnection] = {}  # connection id -> connection, in move order
        self.moved = 0
        self._plan: asyncio.Task[None] | None = None
        self._moves: set[asyncio.Task[None]] = set()
        self._gate = asyncio.Semaphore(MOVE_CONCURRENCY)
        self._stopped = False

    def on_ring_change(self, old: Ring, new: Ring) -> None:
        """Queue the connections whose user moved to a node that just joined."""
        if self._stopped or self.window <= 0 or not old.node_ids or self.node_id not in new:
            return
        added = new.node_ids - old.node_ids
        if not added:
            return
        found = [
            conn
            for user_id, conns in self.hub.by_user.items()
            # only users this node owned: a client that chose this node itself (a direct
            # connection against the ring) is not ours to move
            if new.node_for(user_id) in added and old.node_for(user_id) == self.node_id
            for conn in conns
            if conn.id not in self.pending
        ]
        if not found:
            return
        random.shuffle(found)
        self.pending.update((conn.id, conn) for conn in found)
        log("rebalance_planned", node=self.node_id, joined=sorted(added), connections=len(self.pending))
        if self._plan is not None:
            self._plan.cancel()
        self._plan = asyncio.get_running_loop().create_task(self._run(), name="rebalance")

    async def _run(self) -> None:
        """Move what is pending, evenly spread with jitter over the rebalance window."""
        interval = self.window / max(1, len(self.pending))
        moved = 0
        while self.pending and not self._stopped:
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            conn_id = next(iter(self.pending))
            conn = self.pending.pop(conn_id)
            if self._still_misplaced(conn):
                moved += 1
                task = asyncio.get_running_loop().create_task(self._move(conn))
                self._moves.add(task)
                task.add_done_callback(self._moves.discard)
        self.moved += moved
        log("rebalance_done", node=self.node_id, moved=moved)

    def _still_misplaced(self, conn: ClientConnection) -> bool:
        if conn.closing or self.hub.connections.get(conn.id) is not conn or conn.user_id is None:
            return False
        ring = self.membership.ring
        return self.node_id in ring and ring.node_for(conn.user_id) not in (None, self.node_id)

    async def _move(self, conn: ClientConnection) -> None:
        async with self._gate:
            await conn.send_elsewhere(REASON)

    def stop(self) -> None:
        """Stop planning (the node is draining: every connection moves anyway)."""
        self._stopped = True
        self.pending.clear()
        if self._plan is not None:
            self._plan.cancel()
            self._plan = None
