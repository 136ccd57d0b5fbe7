"""Membership in a real Redis (SPEC §7): join is seen at once, a lapsed lease expires, a withdrawal is immediate."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from conftest import async_wait_until

from cluster.membership import NODES_KEY, NodeInfo, RedisMembership


def _info(node_id: str, connections: int = 0) -> NodeInfo:
    return NodeInfo(node_id, f"ws://127.0.0.1/{node_id}", f"http://127.0.0.1/{node_id}", connections)


async def test_watchers_see_joins_at_once_expire_lapsed_leases_and_drop_withdrawn_nodes(private_redis):
    client = aioredis.Redis.from_url(private_redis.url)
    # a long period: only announcements can make the watcher see a change quickly
    watcher = RedisMembership(client, heartbeat_seconds=5.0, ttl_seconds=0.5)
    node = RedisMembership(client, heartbeat_seconds=5.0, ttl_seconds=0.5)
    changes: list[tuple[frozenset[str], frozenset[str]]] = []
    watcher.on_ring_change(lambda old, new: changes.append((old.node_ids, new.node_ids)))
    task = asyncio.create_task(watcher.watch())
    try:
        await asyncio.wait_for(watcher.loaded.wait(), 5)
        started = time.monotonic()
        await node.announce(_info("n1", 3), join=True)
        await node.announce(_info("n2"), join=True)
        await async_wait_until(lambda: set(watcher.nodes) == {"n1", "n2"}, 2, message="joins seen")
        assert time.monotonic() - started < 1.0
        assert watcher.nodes["n1"].connections == 3 and watcher.nodes["n1"].updated_at > 0

        await node.withdraw("n2")
        await async_wait_until(lambda: set(watcher.nodes) == {"n1"}, 2, message="withdrawal seen")

        await asyncio.sleep(0.6)  # n1's lease lapses; the next read (by anyone) expires and announces it
        await node.refresh()
        await async_wait_until(lambda: not watcher.nodes, 2, message="expiry seen")
        assert await client.zcard(NODES_KEY) == 0
        assert changes[-1] == (frozenset({"n1"}), frozenset())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
