"""Issue 5 end to end: PushClients through the router lose nothing when a node dies or drains.

Real processes: a private redis-server, three `pushctl node`s and a `pushctl router`.
A steady stream is published while one node is SIGKILLed (or SIGTERM-drained); every
client on it reconnects through the router and resumes from its cursors, and across
all clients every event published is handled exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal

import pytest
from conftest import async_wait_until, token

from cluster.client import PushClient
from cluster.events import EventPublisher

CLIENTS = 24
RATE = 40  # events per second: under the 100/s push limit, so nothing is dropped by design
STREAM_SECONDS = 6.0


@pytest.fixture
async def failover_cluster(start_node, start_router, private_redis):
    env = {"PUSH_DRAIN_SECONDS": "1", "PUSH_NODE_TTL_SECONDS": "3", "PUSH_HEARTBEAT_SECONDS": "0.5"}
    nodes = [start_node(f"fo-{i}", redis=private_redis, **env) for i in range(3)]
    router = start_router(redis=private_redis, **env)
    admin = token("fo-admin", roles=["admin"])
    await async_wait_until(
        lambda: len(router.get("/v1/cluster", admin)[1]["nodes"]) == 3, timeout=10, message="3 nodes"
    )
    return nodes, router, private_redis


async def run_stream(redis_url: str, published: list[str], stop: asyncio.Event) -> None:
    publisher = EventPublisher(redis_url, "market-data-collector")
    try:
        while not stop.is_set():
            envelope = await publisher.publish("market.trades", {"n": len(published)}, key="BTC/USDT")
            published.append(envelope["id"])
            await asyncio.sleep(1 / RATE)
    finally:
        await publisher.close()


async def exercise(failover_cluster, sig: int) -> tuple[list[PushClient], dict[str, list[str]], list[str], str]:
    nodes, router, redis = failover_cluster
    handled: dict[str, list[str]] = collections.defaultdict(list)
    clients = []
    for i in range(CLIENTS):
        user = f"fo-user-{i}"
        client = PushClient(router.url, token=token(user), min_backoff=0.05, max_backoff=0.5)
        client.subscribe(["market.trades:BTC/USDT"], lambda event, user=user: handled[user].append(event["data"]["id"]))
        clients.append(await client.start())
    await async_wait_until(lambda: all(c.subscriptions[0].acked.is_set() for c in clients), timeout=10)
    by_node = collections.Counter(c.welcome["node"] for c in clients)
    victim_id = by_node.most_common(1)[0][0]
    victim = next(n for n in nodes if n.node_id == victim_id)

    published: list[str] = []
    stop = asyncio.Event()
    stream = asyncio.create_task(run_stream(redis.url, published, stop))
    await asyncio.sleep(STREAM_SECONDS / 3)
    os.kill(victim.proc.pid, sig)
    await async_wait_until(
        lambda: all(c.welcome["node"] != victim_id for c in clients), timeout=20, message="clients moved"
    )
    await asyncio.sleep(STREAM_SECONDS / 3)
    stop.set()
    await stream
    await async_wait_until(
        lambda: all(len(handled[u]) >= len(published) for u in handled), timeout=15, message="all delivered"
    )
    await asyncio.sleep(0.3)
    for client in clients:
        await client.close()
    victim.proc.wait(timeout=20)
    victim.proc = None
    return clients, handled, published, victim_id


async def test_sigkill_of_a_node_loses_nothing_for_clients_through_the_router(failover_cluster):
    clients, handled, published, _ = await exercise(failover_cluster, signal.SIGKILL)
    moved = [c for c in clients if c.connects > 1]
    assert moved, "some clients were on the killed node"
    assert len(handled) == CLIENTS
    for user, ids in handled.items():
        assert ids == published, f"{user}: {len(ids)} handled, {len(published)} published"


async def test_sigterm_drain_loses_nothing_and_closes_only_with_1012(failover_cluster):
    clients, handled, published, _ = await exercise(failover_cluster, signal.SIGTERM)
    moved = [c for c in clients if c.connects > 1]
    assert moved
    for client in moved:
        assert set(client.close_codes[:-1]) == {1012}, client.close_codes
    for user, ids in handled.items():
        assert ids == published, f"{user}: {len(ids)} handled, {len(published)} published"
