"""The wire protocol of SPEC §4 spoken to a real `pushctl node` over TCP.

Every bad input gets the SPEC's error code (or close code), and after each one
the node still serves another client: a fresh connection subscribes and
receives a freshly published event.

Choices the code makes where the SPEC is silent (asserted below so that a
change is noticed): a binary frame gets ``INVALID_MESSAGE`` and the
connection stays open; a frame over 64 KiB gets close 1009 (possibly after an
``INVALID_MESSAGE`` error); unsubscribing from a pattern that was never
subscribed is acknowledged like any other unsubscribe.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
from conftest import WsClient, publish

MAX_FRAME = 65536


def key() -> str:
    return uuid.uuid4().hex[:12]


async def assert_node_serves_another_client(node: Any, connect: Any) -> None:
    """A new client can still subscribe and receive an event from this node."""
    client: WsClient = await connect(node)
    channel = f"market.trades:{key()}"
    ack = await client.subscribe([channel], request_id="probe")
    assert ack["subscribed"] == [channel]
    envelope = publish(node.redis_url, "market.trades", {"probe": True}, key=channel.partition(":")[2])
    [event] = await client.events(1)
    assert event["data"]["id"] == envelope["id"]
    await client.close()


async def expect_error(client: WsClient, code: str) -> dict[str, Any]:
    error = await client.recv_action("error")
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


async def still_open(client: WsClient) -> None:
    await client.send({"action": "ping", "id": "alive"})
    assert (await client.recv_action("pong")) == {"action": "pong", "id": "alive"}


def ping_frame(size: int) -> str:
    """A valid ping frame of exactly ``size`` bytes."""
    base = '{"action":"ping","pad":""}'
    frame = '{"action":"ping","pad":"' + "x" * (size - len(base)) + '"}'
    assert len(frame.encode()) == size
    return frame


# --- welcome, ack, ping ------------------------------------------------------------------


async def test_welcome_is_the_first_message(shared_node, connect):
    client = await connect(shared_node)
    welcome = client.welcome
    assert welcome["action"] == "welcome"
    assert isinstance(welcome["connectionId"], str) and welcome["connectionId"]
    assert welcome["node"] == "shared"
    assert welcome["userId"] is None
    assert welcome["expiresAt"] is None
    assert isinstance(welcome["limits"], dict)


async def test_every_connection_gets_its_own_connection_id(shared_node, connect):
    ids = {(await connect(shared_node)).welcome["connectionId"] for _ in range(3)}
    assert len(ids) == 3


async def test_ack_echoes_the_request_id(shared_node, connect):
    client = await connect(shared_node)
    channel = f"market.ticker:{key()}"
    await client.send({"action": "subscribe", "channels": [channel], "id": "r1"})
    ack = await client.recv_action("ack")
    assert (ack["subscribed"], ack["unsubscribed"], ack["id"]) == ([channel], [], "r1")
    await client.send({"action": "subscribe", "channels": ["market.trades"], "id": 42})
    assert (await client.recv_action("ack"))["id"] == 42


async def test_ack_without_request_id_has_null_id(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "subscribe", "channels": ["market.trades"]})
    assert (await client.recv_action("ack"))["id"] is None


async def test_subscribing_twice_is_idempotent(shared_node, connect):
    client = await connect(shared_node)
    channel = f"market.ticker:{key()}"
    first = await client.subscribe([channel], request_id="a")
    second = await client.subscribe([channel], request_id="b")
    assert first["subscribed"] == second["subscribed"] == [channel]
    envelope = publish(shared_node.redis_url, "market.ticker", {"p": 1}, key=channel.partition(":")[2])
    [event] = await client.events(1)
    assert event["data"] == envelope
    await client.no_event(0.3)


async def test_unsubscribe_is_acknowledged_and_stops_delivery(shared_node, connect):
    client = await connect(shared_node)
    channel_key = key()
    channel = f"market.ticker:{channel_key}"
    await client.subscribe([channel])
    await client.send({"action": "unsubscribe", "channels": [channel], "id": "r2"})
    ack = await client.recv_action("ack")
    assert (ack["subscribed"], ack["unsubscribed"], ack["id"]) == ([], [channel], "r2")
    publish(shared_node.redis_url, "market.ticker", {"p": 1}, key=channel_key)
    await client.no_event(0.3)


async def test_unsubscribe_removes_only_that_pattern(shared_node, connect):
    client = await connect(shared_node)
    channel_key = key()
    await client.subscribe(["market.*", f"market.ticker:{channel_key}"])
    await client.send({"action": "unsubscribe", "channels": ["market.*"]})
    await client.recv_action("ack")
    publish(shared_node.redis_url, "market.trades", {}, key=channel_key)
    envelope = publish(shared_node.redis_url, "market.ticker", {}, key=channel_key)
    [event] = await client.events(1)
    assert event["data"] == envelope


async def test_unsubscribe_of_a_pattern_never_subscribed_is_acknowledged(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "unsubscribe", "channels": ["market.orderbook"], "id": "u"})
    assert (await client.recv_action("ack"))["unsubscribed"] == ["market.orderbook"]


async def test_ping_gets_pong(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "ping"})
    assert await client.recv() == {"action": "pong"}
    await client.send({"action": "ping", "id": "p7"})
    assert await client.recv() == {"action": "pong", "id": "p7"}


# --- bad channels ---------------------------------------------------------------------------


async def test_bad_channel_rejects_that_channel_only(shared_node, connect):
    client = await connect(shared_node)
    good_key = key()
    good = f"market.ticker:{good_key}"
    await client.send({"action": "subscribe", "channels": [good, "not a channel", "market"], "id": "mix"})
    ack = await client.recv_action("ack")
    assert ack["subscribed"] == [good]
    assert ack["id"] == "mix"
    error = await expect_error(client, "INVALID_CHANNEL")
    assert error["channels"] == ["not a channel", "market"]
    assert error["id"] == "mix"
    envelope = publish(shared_node.redis_url, "market.ticker", {"p": 2}, key=good_key)
    [event] = await client.events(1)
    assert event["data"] == envelope
    await assert_node_serves_another_client(shared_node, connect)


async def test_message_with_only_bad_channels_subscribes_nothing(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "subscribe", "channels": ["market.ticker:a b"], "id": "bad"})
    first = await client.recv()
    if first["action"] == "ack":  # an ack, if any, subscribes nothing
        assert first["subscribed"] == []
        first = await client.recv()
    assert first["action"] == "error" and first["code"] == "INVALID_CHANNEL"
    assert first["channels"] == ["market.ticker:a b"]
    await still_open(client)


async def test_unsubscribe_of_a_bad_channel_is_invalid_channel(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "unsubscribe", "channels": ["%%"], "id": "u"})
    error = await expect_error(client, "INVALID_CHANNEL")
    assert error["channels"] == ["%%"]
    await still_open(client)


# --- malformed frames -------------------------------------------------------------------------


async def test_frame_that_is_not_json_is_invalid_json(shared_node, connect):
    client = await connect(shared_node)
    await client.send('{"action": "subscribe", ')
    await expect_error(client, "INVALID_JSON")
    await still_open(client)
    await assert_node_serves_another_client(shared_node, connect)


@pytest.mark.parametrize(
    "frame",
    [
        "[1, 2]",
        '"subscribe"',
        '{"channels": ["market.*"]}',
        '{"action": "subscribe"}',
        '{"action": "subscribe", "channels": "market.*"}',
        '{"action": "subscribe", "channels": ["market.*"], "options": {"priority": "p9"}}',
        '{"action": "auth"}',
    ],
)
async def test_frame_that_breaks_the_message_shape_is_invalid_message(shared_node, connect, frame):
    client = await connect(shared_node)
    await client.send(frame)
    await expect_error(client, "INVALID_MESSAGE")
    await still_open(client)
    await assert_node_serves_another_client(shared_node, connect)


async def test_invalid_message_echoes_the_request_id(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "subscribe", "channels": [], "id": "empty"})
    assert (await expect_error(client, "INVALID_MESSAGE"))["id"] == "empty"


async def test_unknown_action_is_unknown_action(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "publish", "channels": ["market.*"], "id": "u1"})
    error = await expect_error(client, "UNKNOWN_ACTION")
    assert error["id"] == "u1"
    await still_open(client)
    await assert_node_serves_another_client(shared_node, connect)


async def test_binary_frame_gets_an_error(shared_node, connect):
    client = await connect(shared_node)
    await client.ws.send_bytes(orjson.dumps({"action": "ping"}))
    await expect_error(client, "INVALID_MESSAGE")
    await still_open(client)
    await assert_node_serves_another_client(shared_node, connect)


# --- limits ---------------------------------------------------------------------------------------


async def test_51st_subscription_gets_subscription_limit(shared_node, connect):
    client = await connect(shared_node)
    channels = [f"market.ticker:k{i}" for i in range(51)]
    await client.send({"action": "subscribe", "channels": channels, "id": "many"})
    ack = await client.recv_action("ack")
    assert ack["subscribed"] == channels[:50]
    error = await expect_error(client, "SUBSCRIPTION_LIMIT")
    assert error["channels"] == [channels[50]]
    assert error["id"] == "many"
    await client.send({"action": "subscribe", "channels": ["market.trades"], "id": "more"})
    assert (await expect_error(client, "SUBSCRIPTION_LIMIT"))["channels"] == ["market.trades"]
    assert (await client.subscribe([channels[0]], request_id="again"))["subscribed"] == [channels[0]]
    await client.send({"action": "unsubscribe", "channels": [channels[1]]})
    await client.recv_action("ack")
    assert (await client.subscribe(["market.trades"], request_id="room"))["subscribed"] == ["market.trades"]
    await assert_node_serves_another_client(shared_node, connect)


async def test_twenty_messages_at_once_are_within_the_inbound_limit(shared_node, connect):
    client = await connect(shared_node)
    for i in range(20):
        await client.send({"action": "ping", "id": i})
    for i in range(20):
        assert await client.recv() == {"action": "pong", "id": i}
    await asyncio.sleep(0.1)  # the bucket refills 2 tokens in 0.1 s
    await still_open(client)


async def test_flood_gets_rate_limited_then_close_1008(shared_node, connect):
    client = await connect(shared_node)
    for i in range(40):
        await client.send({"action": "ping", "id": i})
    pongs = 0
    while True:
        message = await client.recv()
        if message["action"] == "pong":
            pongs += 1
            continue
        assert message["action"] == "error" and message["code"] == "RATE_LIMITED", message
        break
    assert 20 <= pongs < 40
    assert await client.closed() == 1008
    await assert_node_serves_another_client(shared_node, connect)


async def test_frame_of_64_kib_is_accepted(shared_node, connect):
    client = await connect(shared_node)
    await client.send(ping_frame(MAX_FRAME))
    assert (await client.recv())["action"] == "pong"


async def test_frame_over_64_kib_closes_1009(shared_node, connect):
    client = await connect(shared_node)
    await client.send(ping_frame(MAX_FRAME + 1))
    assert await client.closed() == 1009
    await assert_node_serves_another_client(shared_node, connect)


async def test_huge_frame_closes_1009(shared_node, connect):
    client = await connect(shared_node)
    await client.send(ping_frame(1_000_000))
    assert await client.closed() == 1009
    await assert_node_serves_another_client(shared_node, connect)


async def test_frame_limit_is_configurable(start_node, connect):
    node = start_node(node_id="wire-small-frames", PUSH_MAX_FRAME_BYTES="1024")
    client = await connect(node)
    await client.send(ping_frame(1024))
    assert (await client.recv())["action"] == "pong"
    await client.send(ping_frame(1025))
    assert await client.closed() == 1009
