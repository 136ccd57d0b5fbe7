"""Interest-routed bus (SPEC §3 bus routing, issue 11), against real nodes and a real Redis.

Private events published with the SDK travel on their user's channel and reach
only the node holding that user; nodes subscribe only to what their connections
need, reference-counted and released after a linger; a subscribe's ack comes
after Redis confirmed the bus subscription it created, so nothing published
after the ack is missed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import orjson
import pytest
from conftest import async_wait_until, publish, publish_raw, start_nodes, token


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def bus_channels(redis_server) -> set[str]:
    client = redis_server.client()
    try:
        return {name.decode() for name in client.pubsub_channels()}
    finally:
        client.close()


def numsub(redis_server, channel: str) -> int:
    client = redis_server.client()
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


def user_route_count(node) -> float:
    return node.metric("bus_messages_total", 'route="user"')


async def test_sdk_private_event_reaches_only_the_node_holding_its_user(private_redis, connect):
    nodes = start_nodes(private_redis, ["route-1", "route-2", "route-3"])
    try:
        alice = uid("alice")
        owner = nodes[1]
        client = await connect(owner, token=token(alice))
        await client.subscribe(["order.*"])
        assert numsub(private_redis, f"push:user:{{{alice}}}") == 1, "one node subscribes to alice's channel"
        before = [user_route_count(node) for node in nodes]
        envelopes = [publish(private_redis.url, "order.filled", {"n": n}, user_id=alice) for n in range(20)]
        assert [e["data"] for e in await client.events(20)] == envelopes
        after = [user_route_count(node) for node in nodes]
        assert after[1] - before[1] == 20, "the owner node took every event from alice's channel"
        assert after[0] == before[0] and after[2] == before[2], "the other nodes never received them"
        for node in (nodes[0], nodes[2]):
            assert node.metric("bus_messages_total", 'route="events"') == 0
            assert node.metric("events_published_total") == 0, "no other node parsed any of them"
    finally:
        for node in nodes:
            node.stop()


def test_sdk_publishes_private_events_on_the_user_channel_and_push_admin(redis_server):
    alice = uid("alice")
    bus = redis_server.client()
    listener = bus.pubsub(ignore_subscribe_messages=True)
    try:
        listener.subscribe(f"push:user:{{{alice}}}", "push:admin")
        envelope = publish(redis_server.url, "order.filled", {"o": 1}, user_id=alice, key="o-17")
        received = {}
        deadline = time.monotonic() + 5
        while len(received) < 2 and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
            if message and message["data"].startswith(b"order.filled:o-17 "):
                received[message["channel"].decode()] = message["data"]
        assert set(received) == {f"push:user:{{{alice}}}", "push:admin"}
        for data in received.values():
            channel, _, raw = data.partition(b" ")
            assert channel == b"order.filled:o-17"
            assert orjson.loads(raw) == envelope
    finally:
        listener.close()
        bus.close()


async def test_node_subscribes_only_to_what_its_connections_need(start_node, private_redis, connect):
    node = start_node(node_id="interest-only", redis=private_redis, PUSH_BUS_LINGER_SECONDS="0.2")
    key = uid("k")
    assert not any(name.startswith("events:") for name in bus_channels(private_redis))
    client = await connect(node)
    await client.subscribe([f"market.ticker:{key}"])
    assert f"events:market.ticker:{key}" in bus_channels(private_redis)
    assert publish_raw(private_redis.url, "events:market.ticker:OTHER", b"{}") == 0, "nobody receives other channels"
    wanted = publish(private_redis.url, "market.ticker", {"p": 1}, key=key)
    assert [e["data"] for e in await client.events(1)] == [wanted]

    await client.send({"action": "unsubscribe", "channels": [f"market.ticker:{key}"], "id": "u"})
    await client.recv_action("ack")
    await async_wait_until(
        lambda: f"events:market.ticker:{key}" not in bus_channels(private_redis),
        timeout=5,
        message="the node to UNSUBSCRIBE once the linger is over",
    )


async def test_user_channel_is_held_while_a_connection_of_the_user_is(start_node, private_redis, connect):
    node = start_node(node_id="interest-user", redis=private_redis, PUSH_BUS_LINGER_SECONDS="0.2")
    alice = uid("alice")
    first = await connect(node, token=token(alice))
    second = await connect(node, token=token(alice))
    await first.subscribe(["order.*"])
    assert numsub(private_redis, f"push:user:{{{alice}}}") == 1, "reference-counted: one subscription per node"
    await first.close()
    await asyncio.sleep(0.6)
    assert numsub(private_redis, f"push:user:{{{alice}}}") == 1, "still held by the second connection"
    await second.close()
    await async_wait_until(
        lambda: numsub(private_redis, f"push:user:{{{alice}}}") == 0,
        timeout=5,
        message="the user channel to be released after the last connection",
    )


async def test_a_short_reconnect_does_not_resubscribe(start_node, private_redis, connect):
    """Within the linger the node keeps the bus subscription: churn costs Redis nothing."""
    node = start_node(node_id="interest-linger", redis=private_redis, PUSH_BUS_LINGER_SECONDS="30")
    alice = uid("alice")
    client = await connect(node, token=token(alice))
    await client.subscribe(["order.*"])
    await client.close()
    again = await connect(node, token=token(alice))
    await again.subscribe(["order.*"])
    assert numsub(private_redis, f"push:user:{{{alice}}}") == 1
    envelope = publish(private_redis.url, "order.filled", {}, user_id=alice)
    assert [e["data"] for e in await again.events(1)] == [envelope]


class Stream(threading.Thread):
    """Publishes numbered events on one channel, recording when each publish began.

    Paced a little (a few ms apart) so that the events after the ack stay within the
    connection's push burst of 100: what is measured is the seam, not the push limit.
    """

    def __init__(self, redis_url: str, event_type: str, **kwargs) -> None:
        super().__init__(daemon=True)
        from cluster.events import DEFAULT_SOURCE_BY_DOMAIN, SyncEventPublisher

        self.publisher = SyncEventPublisher(redis_url, DEFAULT_SOURCE_BY_DOMAIN[event_type.partition(".")[0]])
        self.event_type = event_type
        self.kwargs = kwargs
        self.started_at: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.started_at.append(time.monotonic())
                self.publisher.publish(self.event_type, {"n": len(self.started_at) - 1}, **self.kwargs)
                time.sleep(0.003)
        finally:
            self.publisher.close()


@pytest.mark.parametrize(
    ("pattern", "event"),
    [
        ("market.ticker:{k}", {"event_type": "market.ticker", "key": "{k}"}),
        ("backtest.*", {"event_type": "backtest.progress", "key": "{k}"}),
        ("order.filled", {"event_type": "order.filled", "user_id": "{user}"}),
    ],
    ids=["exact", "wildcard", "private"],
)
async def test_every_event_published_after_the_ack_arrives_while_the_publisher_races_the_subscribe(
    start_node, private_redis, connect, pattern, event
):
    node = start_node(node_id="interest-seam", redis=private_redis)
    for _ in range(5):  # each round creates the node's bus subscription with the subscribe
        k, user = uid("k"), uid("u")
        kwargs = {name: value.format(k=k, user=user) for name, value in event.items()}
        client = await connect(node, token=token(user))
        stream = Stream(private_redis.url, kwargs.pop("event_type"), **kwargs)
        stream.start()
        await async_wait_until(lambda s=stream: len(s.started_at) > 5, message="the publisher to run")
        ack = await client.subscribe([pattern.format(k=k)])
        acked_at = time.monotonic()
        assert ack["subscribed"] == [pattern.format(k=k)]
        await asyncio.sleep(0.3)
        stream.stop.set()
        stream.join(5)
        after_ack = [n for n, began in enumerate(stream.started_at) if began > acked_at]
        assert after_ack, "the publisher published after the ack"
        last = len(stream.started_at) - 1
        received: list[int] = []
        while not received or received[-1] < last:
            received.append((await client.recv_action("event"))["data"]["payload"]["n"])
        seen = set(received)
        assert all(n in seen for n in after_ack), (
            f"missed events published after the ack: {sorted(set(after_ack) - seen)[:5]}"
        )
        assert received == sorted(seen), "in order, each once"
        await client.close()


async def test_overlapping_bus_subscriptions_deliver_each_event_once(start_node, private_redis, connect):
    """``market.*`` (a glob) and ``market.ticker:K`` (a channel) on one node: Redis sends both, clients get one."""
    node = start_node(node_id="interest-overlap", redis=private_redis)
    k = uid("k")
    wide = await connect(node)
    await wide.subscribe(["market.*"])
    narrow = await connect(node)
    await narrow.subscribe([f"market.ticker:{k}"])
    both = await connect(node)
    await both.subscribe([f"market.ticker:{k}", "market.ticker:*"])
    envelopes = [publish(private_redis.url, "market.ticker", {"n": n}, key=k) for n in range(5)]
    for client in (wide, narrow, both):
        assert [e["data"] for e in await client.events(5)] == envelopes
        await client.no_event(0.3)
    assert node.metric("events_published_total") == 5, "each event parsed once"


async def test_private_events_reach_admins_once_even_beside_the_owner(private_redis, connect):
    nodes = start_nodes(private_redis, ["admins-1", "admins-2"])
    try:
        alice = uid("alice")
        owner = await connect(nodes[1], token=token(alice))
        await owner.subscribe(["order.*"])
        owner_admin = await connect(nodes[1], token=token(alice, roles=["admin"]))
        await owner_admin.subscribe(["order.*"])
        local_admin = await connect(nodes[1], token=token(uid("ops"), roles=["admin"]))
        await local_admin.subscribe(["order.*"])
        remote_admin = await connect(nodes[0], token=token(uid("ops"), roles=["admin"]))
        await remote_admin.subscribe(["order.*"])
        envelope = publish(private_redis.url, "order.filled", {"o": 1}, user_id=alice)
        for client in (owner, owner_admin, local_admin, remote_admin):
            assert [e["data"] for e in await client.events(1)] == [envelope]
            await client.no_event(0.3)
        bob_event = publish(private_redis.url, "order.filled", {"o": 2}, user_id=uid("bob"))
        for client in (owner_admin, local_admin, remote_admin):
            assert [e["data"] for e in await client.events(1)] == [bob_event]
        await owner.no_event(0.2)
    finally:
        for node in nodes:
            node.stop()


async def test_plain_publish_of_a_private_event_still_arrives_and_is_counted(shared_node, connect):
    alice = uid("alice")
    client = await connect(shared_node, token=token(alice))
    await client.subscribe(["order.*"])
    before = shared_node.metric("bus_plain_private_events_total")
    envelope = {
        "id": str(uuid.uuid4()),
        "type": "order.filled",
        "source": "order-executor",
        "timestamp": int(time.time() * 1000),
        "version": "1.0",
        "userId": alice,
        "payload": {"plain": True},
    }
    publish_raw(shared_node.redis_url, "events:order.filled", orjson.dumps(envelope))
    assert [e["data"] for e in await client.events(1)] == [envelope]
    assert shared_node.metric("bus_plain_private_events_total") == before + 1


async def test_an_event_of_another_user_on_a_user_channel_is_dropped_as_malformed(shared_node, connect):
    alice, mallory = uid("alice"), uid("mallory")
    client = await connect(shared_node, token=token(alice))
    await client.subscribe(["order.*"])
    before = shared_node.metric("events_dropped_total", 'reason="malformed"')
    foreign = {
        "id": str(uuid.uuid4()),
        "type": "order.filled",
        "source": "order-executor",
        "timestamp": int(time.time() * 1000),
        "version": "1.0",
        "userId": mallory,
        "payload": {},
    }
    publish_raw(shared_node.redis_url, f"push:user:{{{alice}}}", b"order.filled " + orjson.dumps(foreign))
    publish_raw(shared_node.redis_url, f"push:user:{{{alice}}}", b"no-separator-at-all")
    mine = publish(shared_node.redis_url, "order.filled", {"mine": True}, user_id=alice)
    assert [e["data"] for e in await client.events(1)] == [mine]
    assert shared_node.metric("events_dropped_total", 'reason="malformed"') == before + 2


async def test_subscribe_storm_uses_a_bounded_number_of_redis_connections(start_node, private_redis, connect):
    node = start_node(node_id="interest-storm", redis=private_redis)
    redis_client = private_redis.client()
    try:
        baseline = int(redis_client.info("clients")["connected_clients"])
        count = 300
        clients = await asyncio.gather(*(connect(node, token=token(uid("s"))) for _ in range(count)))
        acks = await asyncio.gather(*(c.subscribe([f"market.ticker:S{i}"]) for i, c in enumerate(clients)))
        assert all(ack["action"] == "ack" for ack in acks)
        peak = int(redis_client.info("clients")["connected_clients"])
        assert peak - baseline <= 40, f"{peak - baseline} Redis connections for {count} subscribing clients"
        assert len([n for n in bus_channels(private_redis) if n.startswith("events:market.ticker:S")]) == count
        envelope = publish(private_redis.url, "market.ticker", {}, key=f"S{count - 1}")
        assert [e["data"] for e in await clients[-1].events(1)] == [envelope]
    finally:
        redis_client.close()
