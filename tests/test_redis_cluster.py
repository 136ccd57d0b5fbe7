"""The SPEC on a Redis Cluster (3 masters + 3 replicas): delivery, recovery, caps and a master's failover.

Nodes and the SDK get ``redis+cluster://host:port,…``; private events travel on
sharded user channels, so the users below are chosen to land on every shard.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import NodeProcess, async_wait_until, free_port, node_env, start_nodes, token
from redis_cluster import RedisClusterProcesses

from cluster.bus_routing import user_channel
from cluster.client import PushClient
from cluster.events import EventPublisher
from cluster.history import cluster_stream_key

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_nodes(redis_cluster: RedisClusterProcesses) -> Iterator[list[NodeProcess]]:
    nodes = start_nodes(redis_cluster, ["rc-1", "rc-2"])  # type: ignore[arg-type]
    yield nodes
    for node in nodes:
        node.stop()


def users_on_every_shard(cluster: RedisClusterProcesses, prefix: str) -> list[str]:
    """One user per master: their private events take three different shards."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < 3:
        user = f"{prefix}-{i}"
        found.setdefault(cluster.master_port_of(user_channel(user)), user)
        i += 1
    return list(found.values())


async def publish_all(url: str, events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    publisher = EventPublisher(url, source="order-executor", allow_unknown=True)
    try:
        return [await publisher.publish(event_type, {"n": i}, **kwargs) for i, (event_type, kwargs) in enumerate(events)]
    finally:
        await publisher.close()


async def test_private_keyed_and_wildcard_events_reach_exactly_their_subscribers_across_shards(
    redis_cluster: RedisClusterProcesses, cluster_nodes: list[NodeProcess], connect: Any
) -> None:
    users = users_on_every_shard(redis_cluster, "trader")
    clients = {}
    for i, user in enumerate(users):
        client = await connect(cluster_nodes[i % 2], token=token(user))
        ack = await client.subscribe(["order.*"])
        assert ack["subscribed"] == ["order.*"]
        clients[user] = client
    key = f"BTC-{uuid.uuid4().hex[:8]}"  # no latest value left by another test comes first
    ticker = await connect(cluster_nodes[1])
    await ticker.subscribe([f"market.ticker:{key}"])
    wildcard = await connect(cluster_nodes[0])
    await wildcard.subscribe(["market.*"])

    published = await publish_all(
        redis_cluster.url,
        [("order.filled", {"user_id": user, "key": f"o-{user}"}) for user in users]
        + [("market.ticker", {"key": key}), ("market.ticker", {"key": "ETH/USDT"}), ("market.trades", {})],
    )
    for user, envelope in zip(users, published, strict=False):
        [event] = await clients[user].events(1)
        assert event["data"]["id"] == envelope["id"] and event["channel"] == f"order.filled:o-{user}"
        await clients[user].no_event(0.3)  # nobody else's
    [btc] = await ticker.events(1)
    assert btc["data"]["id"] == published[3]["id"]
    await ticker.no_event(0.3)
    market = await wildcard.events(3)
    assert [e["data"]["id"] for e in market] == [e["id"] for e in published[3:]]


async def test_a_plain_publish_on_a_user_channel_still_reaches_the_user(
    redis_cluster: RedisClusterProcesses, cluster_nodes: list[NodeProcess], connect: Any
) -> None:
    """Another language may send the routed message with a plain PUBLISH (docs/BUS.md): classic pub/sub carries it."""
    import orjson

    from cluster.envelope import build_envelope

    client = await connect(cluster_nodes[0], token=token("plain-user"))
    await client.subscribe(["risk.*"])
    envelope = build_envelope("risk.alert", {"level": "high"}, source="risk-manager", user_id="plain-user")
    routed = b"risk.alert " + orjson.dumps(envelope)
    cluster = redis_cluster.client()
    try:
        cluster.publish(user_channel("plain-user"), routed)
        cluster.publish(user_channel("another-user"), routed.replace(b"plain-user", b"another-user"))
    finally:
        cluster.close()
    [event] = await client.events(1)
    assert event["data"]["id"] == envelope["id"]
    await client.no_event(0.3)


async def test_recovery_with_since_replays_what_was_missed_across_shards(
    redis_cluster: RedisClusterProcesses, cluster_nodes: list[NodeProcess], connect: Any
) -> None:
    user = users_on_every_shard(redis_cluster, "recoverer")[0]
    client = await connect(cluster_nodes[0], token=token(user))
    ack = await client.subscribe(["order.*", "market.*"])
    position = ack["cursor"]
    first = await publish_all(redis_cluster.url, [("order.created", {"user_id": user, "key": "r-1"})])
    [seen] = await client.events(1)
    assert seen["data"]["id"] == first[0]["id"]
    await client.close()

    missed = await publish_all(
        redis_cluster.url,
        [
            ("order.filled", {"user_id": user, "key": "r-1"}),
            ("market.ticker", {"key": "SOL/USDT"}),
            ("order.cancelled", {"user_id": user, "key": "r-2"}),
            ("order.filled", {"user_id": "someone-else", "key": "r-3"}),
        ],
    )
    again = await connect(cluster_nodes[1], token=token(user))
    ack = await again.subscribe(["order.*", "market.*"], since=seen["cursor"])
    assert ack["recovered"] == {"order.*": True, "market.*": True}
    replayed = await again.events(3)  # pattern by pattern, each in publish order
    assert [e["data"]["id"] for e in replayed] == [missed[0]["id"], missed[2]["id"], missed[1]["id"]]
    await again.no_event(0.3)

    fresh = await connect(cluster_nodes[0], token=token(user))  # a client that saw nothing: the ack's position
    ack = await fresh.subscribe(["order.*", "market.*"], since=position)
    assert ack["recovered"] == {"order.*": True, "market.*": True}
    expected = [first[0]["id"], missed[0]["id"], missed[2]["id"], missed[1]["id"]]
    assert [e["data"]["id"] for e in await fresh.events(4)] == expected


async def test_the_sixth_connection_of_a_user_is_refused_cluster_wide(
    cluster_nodes: list[NodeProcess], connect: Any
) -> None:
    for i in range(5):
        await connect(cluster_nodes[i % 2], token=token("capped"))
    sixth = await connect(cluster_nodes[1], token=token("capped"), expect_welcome=False)
    error = await sixth.recv_action("error")
    assert error["code"] == "TOO_MANY_CONNECTIONS"
    assert await sixth.closed() == 4029


async def test_pushctl_publish_and_router_work_on_a_cluster_url(
    redis_cluster: RedisClusterProcesses, cluster_nodes: list[NodeProcess], connect: Any
) -> None:
    import subprocess
    import sys

    from conftest import ROOT, RouterProcess

    router = RouterProcess(free_port(), redis_cluster.url, node_env(), [])
    router.start()
    try:
        client = await connect(router.url, token=token("cli-user"))
        assert client.welcome["node"] in {node.node_id for node in cluster_nodes}
        await client.subscribe(["order.*"])
        done = subprocess.run(
            [sys.executable, "-m", "pushctl.cli", "publish", "order.filled", "--payload", '{"via":"cli"}',
             "--user", "cli-user", "--redis-url", redis_cluster.url],
            env=node_env(), cwd=ROOT, capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        [event] = await client.events(1)
        assert event["data"]["payload"] == {"via": "cli"}
    finally:
        router.stop()


async def test_a_master_sigkilled_under_load_loses_nothing_for_a_resuming_client() -> None:
    """The master owning a busy user's slot (and its channel's history) dies mid-stream.

    The SDK keeps publishing (it waits for the new master), the node re-subscribes
    where the slot went and catches up from history, and the PushClient, cut off
    while the failover runs, resumes with its cursor: it ends with every event the
    SDK acknowledged exactly once, or was told ``recovered: false``.
    """
    cluster = RedisClusterProcesses()
    cluster.start()
    nodes: list[NodeProcess] = []
    failed_over = True
    try:
        history_master = cluster.master_port_of(cluster_stream_key("order.filled"))
        user = next(
            u for u in (f"busy-{i}" for i in range(10_000)) if cluster.master_port_of(user_channel(u)) == history_master
        )
        nodes = start_nodes(cluster, ["fo-1"])  # type: ignore[arg-type]
        received: list[str] = []
        unrecovered: list[list[str]] = []
        client = PushClient(nodes[0].url, token=token(user), on_unrecovered=unrecovered.append, max_backoff=1.0)
        await client.start()
        client.subscribe(["order.*"], lambda event: received.append(event["data"]["id"]))
        await asyncio.wait_for(client.connected.wait(), 10)
        await async_wait_until(lambda: client.subscriptions[0].acked.is_set(), 10, message="subscribed")

        publisher = EventPublisher(cluster.url, source="order-executor")
        acknowledged: list[str] = []

        async def publish_stream() -> None:
            for i in range(150):
                envelope = await publisher.publish("order.filled", {"n": i}, user_id=user)
                acknowledged.append(envelope["id"])
                await asyncio.sleep(0.02)

        stream = asyncio.create_task(publish_stream())
        await async_wait_until(lambda: len(received) >= 20, 15, message="events before the kill")
        cluster.kill(history_master)
        await asyncio.sleep(0.2)
        assert client._ws is not None
        await client._ws.close()  # the client is cut off too, and resumes while the slot fails over
        started = time.monotonic()
        try:
            cluster.wait_failover(history_master, user_channel(user))
        except RuntimeError:
            failed_over = False
            raise
        else:
            failed_over = True
        failover_seconds = time.monotonic() - started
        await asyncio.wait_for(stream, 90)
        published_seconds = time.monotonic() - started
        await publisher.close()

        def complete() -> bool:
            return bool(unrecovered) or set(received) >= set(acknowledged)

        await async_wait_until(complete, 30, message="every acknowledged event, or recovered: false")
        await asyncio.sleep(0.5)
        await client.close()
        assert len(received) == len(set(received)), "an event arrived twice"
        if not unrecovered:
            assert set(received) == set(acknowledged)
        print(
            f"failover {failover_seconds:.1f} s, stream done {published_seconds:.1f} s after the kill, "
            f"complete {time.monotonic() - started:.1f} s, {len(acknowledged)} published, unrecovered={unrecovered}"
        )
    finally:
        for node in nodes:
            node.stop()
        cluster.stop(keep_logs=not failed_over)


async def test_state_channels_number_their_events_and_give_the_latest_value_on_a_cluster(
    redis_cluster: RedisClusterProcesses, cluster_nodes: list[NodeProcess], connect: Any
) -> None:
    published = await publish_all(redis_cluster.url, [("market.orderbook", {"key": "RC/STATE"})] * 3)
    assert [e["seq"] for e in published] == [1, 2, 3]
    client = await connect(cluster_nodes[1])
    await client.subscribe(["market.orderbook:RC/STATE"], snapshot=True)
    [latest] = await client.events(1)
    assert latest["data"] == published[2] and latest["seq"] == 3
    [live] = await publish_all(redis_cluster.url, [("market.orderbook", {"key": "RC/STATE"})])
    [event] = await client.events(1)
    assert event["data"] == live and event["seq"] == 4
