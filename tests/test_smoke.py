"""A node started with `pushctl node` welcomes, subscribes and delivers (SPEC §4)."""

import uuid

from conftest import publish, token


async def test_welcome_names_node_user_and_limits(shared_node, connect):
    client = await connect(shared_node, token=token("alice"))
    welcome = client.welcome
    assert welcome["node"] == "shared"
    assert welcome["userId"] == "alice"
    assert isinstance(welcome["expiresAt"], int)
    assert welcome["limits"]["maxSubscriptions"] == 50


async def test_public_event_reaches_anonymous_subscriber(shared_node, connect):
    key = f"BTC-{uuid.uuid4().hex[:8]}"  # a ticker no other test published to: no latest value comes first
    client = await connect(shared_node)
    ack = await client.subscribe([f"market.ticker:{key}"])
    assert ack["subscribed"] == [f"market.ticker:{key}"]
    envelope = publish(shared_node.redis_url, "market.ticker", {"price": 1}, key=key)
    [event] = await client.events(1)
    assert event["channel"] == f"market.ticker:{key}"
    assert event["data"] == envelope
    assert event["cursor"]
