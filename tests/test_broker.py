"""The Redis broker in-process against a real redis-server: interest, confirmation, one delivery per event."""

from __future__ import annotations

import asyncio

import pytest
from conftest import async_wait_until

from cluster.broker import RedisBroker


@pytest.fixture
async def running_broker(private_redis):
    brokers = []

    async def start(url: str | None = None, linger: float = 0.0) -> tuple[RedisBroker, list[tuple[bytes, bytes]]]:
        broker = RedisBroker(url or private_redis.url, linger_seconds=linger, name="test node")
        received: list[tuple[bytes, bytes]] = []
        task = asyncio.create_task(broker.run(lambda channel, data: received.append((channel, data))))
        brokers.append((broker, task))
        await asyncio.wait_for(broker.ready.wait(), 10)
        return broker, received

    yield start
    for broker, task in brokers:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()


async def test_settled_means_redis_already_delivers_the_new_subscriptions(private_redis, running_broker):
    broker, _ = await running_broker()
    names = [f"events:market.ticker:S{i}" for i in range(50)] + ["events:backtest.*"]
    broker.want(names)
    assert await broker.settled(names, 5)
    client = private_redis.client()
    try:
        counts = dict(client.pubsub_numsub(*names[:50]))
        assert set(counts.values()) == {1}, "every channel subscribed when settled returns"
        assert client.pubsub_numpat() == 1
    finally:
        client.close()


async def test_overlapping_subscriptions_hand_each_message_over_once(private_redis, running_broker):
    broker, received = await running_broker()
    names = ["events:market.ticker:BTC", "events:market.*", "events:market.ticker:*", "events:*"]
    broker.want(names)
    assert await broker.settled(names, 5)
    assert await broker.publish("events:market.ticker:BTC", b"one") == 4, "Redis sends it four times"
    assert await broker.publish("events:market.trades", b"two") == 2
    assert await broker.publish("events:NOT-A-CHANNEL", b"three") == 1
    await async_wait_until(lambda: len(received) >= 3, timeout=5, message="three messages")
    await asyncio.sleep(0.2)
    assert received == [
        (b"events:market.ticker:BTC", b"one"),
        (b"events:market.trades", b"two"),
        (b"events:NOT-A-CHANNEL", b"three"),
    ]
    broker.unwant(["events:market.ticker:BTC", "events:*"])
    await async_wait_until(lambda: len(broker.interest.subscribed) == 3, timeout=5, message="the linger sweep")
    client = private_redis.client()
    try:
        await async_wait_until(lambda: client.pubsub_numpat() == 2, timeout=5, message="PUNSUBSCRIBE events:*")
    finally:
        client.close()
    assert await broker.publish("events:market.ticker:BTC", b"four") == 2
    await async_wait_until(lambda: len(received) >= 4, timeout=5, message="the fourth message")
    await asyncio.sleep(0.2)
    assert received[3:] == [(b"events:market.ticker:BTC", b"four")]


async def test_unused_names_linger_before_unsubscribe(private_redis, running_broker):
    broker, _ = await running_broker(linger=0.5)
    broker.want(["events:order.*"])
    assert await broker.settled(["events:order.*"], 5)
    broker.unwant(["events:order.*"])
    client = private_redis.client()
    try:
        await asyncio.sleep(0.25)
        assert client.pubsub_numpat() == 1, "still subscribed during the linger"
        await async_wait_until(lambda: client.pubsub_numpat() == 0, timeout=5, message="PUNSUBSCRIBE after the linger")
    finally:
        client.close()


async def test_the_bus_connection_carries_the_node_name(private_redis, running_broker):
    await running_broker()
    client = private_redis.client()
    try:
        names = [c["name"] for c in client.client_list()]
        assert "push-bus:test_node" in names
    finally:
        client.close()


async def test_a_refused_subscribe_reconnects_until_redis_allows_it(private_redis, running_broker):
    admin = private_redis.client()
    try:
        admin.execute_command(
            "ACL",
            "SETUSER",
            "bus",
            "on",
            ">bus-password",
            "~*",
            "+@all",
            "resetchannels",
            "&events:*",
            "&spirit:events",
        )
        url = f"redis://bus:bus-password@127.0.0.1:{private_redis.port}/0"
        broker, received = await running_broker(url)
        broker.want(["push:user:{alice}"])
        assert not await broker.settled(["push:user:{alice}"], 2), "NOPERM: not delivered"
        await async_wait_until(lambda: not broker.ready.is_set(), timeout=5, message="the broker to notice")
        admin.execute_command("ACL", "SETUSER", "bus", "allchannels")
        await async_wait_until(broker.ready.is_set, timeout=10, message="the broker to resubscribe")
        assert await broker.settled(["push:user:{alice}"], 5)
        assert admin.publish("push:user:{alice}", b"hello") == 1
        await async_wait_until(lambda: received, timeout=5, message="the message")
        assert received == [(b"push:user:{alice}", b"hello")]
    finally:
        admin.close()


async def test_a_wrong_password_is_a_bus_error_not_a_crash(private_redis):
    broker = RedisBroker(f"redis://nobody:wrong@127.0.0.1:{private_redis.port}/0")
    task = asyncio.create_task(broker.run(lambda channel, data: None))
    try:
        await asyncio.sleep(0.5)
        assert not task.done(), "the broker keeps retrying"
        assert not broker.ready.is_set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()


async def test_a_bus_that_is_only_behind_is_not_taken_for_dead() -> None:
    """An unanswered health PING fails the connection only when nothing at all is being read."""
    import time

    from cluster.bus_reader import BusConnection

    conn = BusConnection(lambda channel, message: None, lambda exc: None)
    assert not conn.stalled(time.monotonic())  # no PING outstanding
    conn.ping()  # no transport: the PING stays unanswered
    conn.data_received(b"*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$1\r\ny\r\n")  # but messages keep arriving
    assert not conn.stalled(time.monotonic() - 5)
    assert conn.stalled(time.monotonic() + 1)  # nothing read since: dead


async def test_messages_wait_until_the_node_is_ready_then_arrive_in_order(private_redis):
    """While on_ready runs (a node catching its clients up from history), live messages are
    held, then handed over in arrival order: none overtakes what the catch-up delivers."""
    broker = RedisBroker(private_redis.url, linger_seconds=0.0, name="test node")
    broker.want(["events:order.*"])
    received: list[bytes] = []
    catching_up, caught_up = asyncio.Event(), asyncio.Event()

    async def on_ready() -> None:
        catching_up.set()
        await caught_up.wait()
        received.append(b"replayed")  # what a catch-up hands over

    broker.on_ready = on_ready
    task = asyncio.create_task(broker.run(lambda channel, data: received.append(data)))
    try:
        await asyncio.wait_for(catching_up.wait(), 10)
        client = private_redis.client()
        try:
            for n in range(3):
                assert client.publish("events:order.filled", f"live {n}".encode()) == 1
        finally:
            client.close()
        await asyncio.sleep(0.3)
        assert received == [], "nothing is delivered while the node is not ready"
        caught_up.set()
        await asyncio.wait_for(broker.ready.wait(), 5)
        assert received == [b"replayed", b"live 0", b"live 1", b"live 2"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()


async def test_held_messages_are_bounded_and_a_bad_one_does_not_stop_the_rest():
    from cluster.bus_hold import HoldUntilReady

    out: list[bytes] = []
    errors: list[BaseException] = []

    def handler(channel: bytes, data: bytes) -> None:
        if data == b"bad":
            raise ValueError("bad")
        out.append(data)

    held = HoldUntilReady(handler, errors.append, limit=3)
    for data in (b"1", b"bad", b"3", b"4"):  # the 4th is past the limit: it goes straight through
        held(b"events:x", data)
    assert out == [b"4"] and held.holding == 3
    await held.release()
    assert out == [b"4", b"1", b"3"] and len(errors) == 1 and held.holding == 0
    held(b"events:x", b"5")
    assert out[-1] == b"5", "after release messages pass at once"
