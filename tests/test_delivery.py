"""Routing and authorization of events (SPEC §2–§3) through a real node and Redis.

Absence is checked without sleeping: after the event that must not arrive, a
*marker* event that the client does receive is published on the same bus; Redis
and the node keep publish order, so a client whose next event is the marker
never got the forbidden one.

Choices the code makes where the SPEC is silent: an event with a ``userId`` is
private to that user (and admins) whatever its domain, public ones included;
an anonymous client may subscribe to ``*`` and then receives public events only.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import pytest
from conftest import WsClient, async_wait_until, publish, publish_raw, token


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def raw_envelope(event_type: str = "order.filled", **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": event_type,
        "source": "order-executor",
        "timestamp": int(time.time() * 1000),
        "version": "1.0",
        "payload": {"n": 1},
    }
    doc.update(overrides)
    return doc


async def events_until(client: WsClient, marker: dict[str, Any], timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every event the client receives before ``marker`` (an envelope), which must arrive."""
    received = []
    deadline = time.monotonic() + timeout
    while True:
        event = await client.recv_action("event", max(0.05, deadline - time.monotonic()))
        if event["data"]["id"] == marker["id"]:
            return received
        received.append(event)


async def subscribed(connect: Any, node: Any, channels: list[str], tok: str | None = None, **options: Any) -> WsClient:
    client: WsClient = await connect(node, token=tok)
    ack = await client.subscribe(channels, **options)
    assert ack["subscribed"] == channels, ack
    return client


# --- private events ----------------------------------------------------------------------


async def test_private_event_reaches_its_user_and_admins(shared_node, connect):
    alice = uid("alice")
    owner = await subscribed(connect, shared_node, ["order.*"], token(alice))
    admin = await subscribed(connect, shared_node, ["order.*"], token(uid("ops"), roles=["admin"]))
    envelope = publish(shared_node.redis_url, "order.filled", {"qty": 1}, user_id=alice)
    for client in (owner, admin):
        [event] = await client.events(1)
        assert event["channel"] == "order.filled"
        assert event["data"] == envelope


async def test_private_event_does_not_reach_other_users_or_anonymous(shared_node, connect):
    alice, bob = uid("alice"), uid("bob")
    other = await subscribed(connect, shared_node, ["order.*"], token(bob))
    anonymous = await subscribed(connect, shared_node, ["*"])
    publish(shared_node.redis_url, "order.filled", {"secret": True}, user_id=alice)
    publish(shared_node.redis_url, "risk.alert", {"secret": True}, user_id=alice)
    bob_marker = publish(shared_node.redis_url, "order.filled", {"for": "bob"}, user_id=bob)
    public_marker = publish(shared_node.redis_url, "market.trades", {}, key=uid("k"))
    assert await events_until(other, bob_marker) == []
    assert await events_until(anonymous, public_marker) == []


async def test_user_id_makes_even_a_public_domain_event_private(shared_node, connect):
    alice = uid("alice")
    channel_key = uid("k")
    owner = await subscribed(connect, shared_node, ["market.*"], token(alice))
    anonymous = await subscribed(connect, shared_node, ["market.*"])
    envelope = publish(shared_node.redis_url, "market.trades", {"fill": 1}, key=channel_key, user_id=alice)
    marker = publish(shared_node.redis_url, "market.trades", {}, key=channel_key)
    assert [e["data"] for e in await events_until(owner, marker)] == [envelope]
    assert await events_until(anonymous, marker) == []


async def test_event_without_user_id_on_a_private_domain_reaches_every_authenticated_subscriber(shared_node, connect):
    alice = await subscribed(connect, shared_node, ["strategy.*"], token(uid("alice")))
    bob = await subscribed(connect, shared_node, ["strategy.updated"], token(uid("bob")))
    anonymous = await subscribed(connect, shared_node, ["*"])
    envelope = publish(shared_node.redis_url, "strategy.updated", {"id": "s1"})
    for client in (alice, bob):
        [event] = await client.events(1)
        assert event["data"] == envelope
    marker = publish(shared_node.redis_url, "market.trades", {}, key=uid("k"))
    assert await events_until(anonymous, marker) == []


async def test_session_event_reaches_only_connections_of_that_session(shared_node, connect):
    alice = uid("alice")
    tab1 = await subscribed(connect, shared_node, ["order.*"], token(alice, sid="tab-1"))
    tab2 = await subscribed(connect, shared_node, ["order.*"], token(alice, sid="tab-2"))
    no_sid = await subscribed(connect, shared_node, ["order.*"], token(alice))
    envelope = publish(shared_node.redis_url, "order.filled", {"q": 1}, user_id=alice, session_id="tab-1")
    marker = publish(shared_node.redis_url, "order.created", {}, user_id=alice)
    assert [e["data"] for e in await events_until(tab1, marker)] == [envelope]
    assert await events_until(tab2, marker) == []
    assert await events_until(no_sid, marker) == []


# --- options.priority -------------------------------------------------------------------------


async def test_priority_option_delivers_only_that_priority_or_higher(shared_node, connect):
    alice = uid("alice")
    client = await subscribed(connect, shared_node, ["order.*"], token(alice), priority="p1")
    sent = {}
    for priority in ("p3", "p2", None, "p1", "p0"):
        sent[priority] = publish(
            shared_node.redis_url, "order.filled", {"p": priority}, user_id=alice, priority=priority
        )
    marker = publish(shared_node.redis_url, "order.created", {}, user_id=alice, priority="p0")
    received = [e["data"] for e in await events_until(client, marker)]
    assert received == [sent["p1"], sent["p0"]]


async def test_absent_priority_is_p2_for_the_filter(shared_node, connect):
    channel_key = uid("k")
    p2 = await subscribed(connect, shared_node, [f"market.trades:{channel_key}"], priority="p2")
    envelope = publish(shared_node.redis_url, "market.trades", {}, key=channel_key)
    [event] = await p2.events(1)
    assert event["data"] == envelope


async def test_priority_option_applies_to_its_own_subscription_only(shared_node, connect):
    channel_key = uid("k")
    client: WsClient = await connect(shared_node)
    await client.subscribe([f"market.ticker:{channel_key}"], request_id="a", priority="p0")
    await client.subscribe([f"market.trades:{channel_key}"], request_id="b")
    publish(shared_node.redis_url, "market.ticker", {}, key=channel_key, priority="p3")
    trades = publish(shared_node.redis_url, "market.trades", {}, key=channel_key, priority="p3")
    marker = publish(shared_node.redis_url, "market.ticker", {}, key=channel_key, priority="p0")
    assert [e["data"] for e in await events_until(client, marker)] == [trades]


async def test_event_is_delivered_when_any_matching_subscription_admits_its_priority(shared_node, connect):
    k = uid("k")
    client: WsClient = await connect(shared_node)
    await client.subscribe(["market.*"], request_id="urgent-only", priority="p0")
    await client.subscribe([f"market.ticker:{k}"], request_id="all")
    envelope = publish(shared_node.redis_url, "market.ticker", {}, key=k, priority="p3")
    publish(shared_node.redis_url, "market.trades", {}, key=k, priority="p3")
    marker = publish(shared_node.redis_url, "market.trades", {}, key=k, priority="p0")
    assert [e["data"] for e in await events_until(client, marker)] == [envelope]


# --- patterns ---------------------------------------------------------------------------------


async def test_patterns_match_end_to_end(shared_node, connect):
    k = uid("k")
    patterns = ["market.*", f"market.ticker:{k}", "market.ticker", "market.ticker:*", "*", f"market.*:{k}"]
    # snapshot off: "market.ticker" and "market.ticker:*" would first get every ticker other tests left on the Redis
    clients = {p: await subscribed(connect, shared_node, [p], snapshot=False) for p in patterns}
    url = shared_node.redis_url
    keyed = publish(url, "market.ticker", {}, key=k)
    other_key = publish(url, "market.ticker", {}, key=k + "x")
    keyless = publish(url, "market.ticker", {})
    trades = publish(url, "market.trades", {}, key=k)
    marker = publish(url, "market.ticker", {"marker": True}, key=k)
    expected = {
        "market.*": [keyed, other_key, keyless, trades],
        f"market.ticker:{k}": [keyed],
        "market.ticker": [keyed, other_key, keyless],
        "market.ticker:*": [keyed, other_key],
        "*": [keyed, other_key, keyless, trades],
        f"market.*:{k}": [keyed, trades],
    }
    for pattern, client in clients.items():
        received = [e["data"]["id"] for e in await events_until(client, marker)]
        assert received == [e["id"] for e in expected[pattern]], pattern


async def test_patterns_apply_to_private_events_too(shared_node, connect):
    alice = uid("alice")
    wanted = await subscribed(connect, shared_node, ["backtest.progress:bt-1"], token(alice))
    other = await subscribed(connect, shared_node, ["backtest.progress:bt-2", "backtest.completed"], token(alice))
    envelope = publish(shared_node.redis_url, "backtest.progress", {"pct": 50}, key="bt-1", user_id=alice)
    marker = publish(shared_node.redis_url, "backtest.progress", {"pct": 100}, key="bt-1", user_id=alice)
    assert [e["data"] for e in await events_until(wanted, marker)] == [envelope]
    end = publish(shared_node.redis_url, "backtest.progress", {}, key="bt-2", user_id=alice)
    assert await events_until(other, end) == []


async def test_event_channel_names_the_type_and_key(shared_node, connect):
    k = uid("k")
    client = await subscribed(connect, shared_node, ["market.*"])
    publish(shared_node.redis_url, "market.orderbook", {}, key=f"{k}/USDT")
    publish(shared_node.redis_url, "market.trades", {})
    channels = [e["channel"] for e in await client.events(2)]
    assert channels == [f"market.orderbook:{k}/USDT", "market.trades"]


@pytest.mark.parametrize(
    "patterns,event",
    [
        (["market.*", "market.ticker:{k}", "*", "market.ticker"], {"event_type": "market.ticker", "key": "{k}"}),
        (["order.*", "order.filled", "*"], {"event_type": "order.filled", "user_id": "{user}"}),
        (["risk.*", "risk.alert:{k}", "risk.alert", "*"], {"event_type": "risk.alert", "key": "{k}"}),
    ],
    ids=["public", "private", "broadcast-on-private-domain"],
)
async def test_event_matching_several_patterns_of_one_connection_is_delivered_once(
    shared_node, connect, patterns, event
):
    k, user = uid("k"), uid("alice")
    # snapshot off: "market.ticker" would first get the latest value of every ticker other tests published
    client = await subscribed(connect, shared_node, [p.format(k=k) for p in patterns], token(user), snapshot=False)
    kwargs = {name: value.format(k=k, user=user) for name, value in event.items()}
    envelope = publish(shared_node.redis_url, kwargs.pop("event_type"), {"once": True}, **kwargs)
    marker = publish(shared_node.redis_url, "order.created", {}, user_id=user)
    assert [e["data"] for e in await events_until(client, marker)] == [envelope]


# --- the bus ------------------------------------------------------------------------------------


def test_sdk_publishes_on_redis_events_channel(redis_server):
    bus = redis_server.client()
    listener = bus.pubsub(ignore_subscribe_messages=True)
    try:
        listener.psubscribe("events:*")
        key = uid("k")
        envelope = publish(redis_server.url, "market.ticker", {"p": 1}, key=f"{key}/USDT")
        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            candidate = listener.get_message(timeout=0.5)
            if candidate and orjson.loads(candidate["data"]).get("id") == envelope["id"]:
                message = candidate
        assert message is not None, "the SDK's event never appeared on Redis"
        assert message["channel"] == f"events:market.ticker:{key}/USDT".encode()
        assert orjson.loads(message["data"]) == envelope
    finally:
        listener.close()
        bus.close()


# --- the envelope as delivered ---------------------------------------------------------------


async def test_delivered_event_carries_the_envelope_untouched_and_a_cursor(shared_node, connect):
    alice = uid("alice")
    client = await subscribed(connect, shared_node, ["ai.*"], token(alice))
    envelope = publish(
        shared_node.redis_url,
        "ai.insight_generated",
        {"text": "ünïcode ✓", "score": 0.25, "tags": ["a", None]},
        user_id=alice,
        priority="p1",
        ttl=60_000,
        correlation_id="trace-42",
    )
    [event] = await client.events(1)
    assert event["action"] == "event"
    assert event["data"] == envelope
    assert event["data"]["correlationId"] == "trace-42"
    assert isinstance(event["cursor"], str) and event["cursor"]


async def test_unknown_type_and_source_are_delivered_for_forward_compatibility(shared_node, connect):
    alice = uid("alice")
    client = await subscribed(connect, shared_node, ["portfolio.*"], token(alice))
    envelope = raw_envelope("portfolio.rebalanced", source="portfolio-service", userId=alice)
    publish_raw(shared_node.redis_url, "events:portfolio.rebalanced", orjson.dumps(envelope))
    [event] = await client.events(1)
    assert event["channel"] == "portfolio.rebalanced"
    assert event["data"] == envelope


# --- legacy spirit:events -------------------------------------------------------------------


async def test_legacy_envelope_keeps_its_type_as_channel(shared_node, connect):
    client = await subscribed(connect, shared_node, ["spirit.*"], token(uid("alice")))
    envelope = raw_envelope("spirit.state_change", source="signal-analyzer", payload={"state": "thinking"})
    publish_raw(shared_node.redis_url, "spirit:events", orjson.dumps(envelope))
    [event] = await client.events(1)
    assert event["channel"] == "spirit.state_change"
    assert event["data"] == envelope


@pytest.mark.parametrize("message", [{"text": "hello", "level": "info"}, "plain text", [1, 2, 3]])
async def test_legacy_other_json_is_wrapped_as_spirit_notification(shared_node, connect, message):
    client = await subscribed(connect, shared_node, ["spirit.notification"], token(uid("alice")))
    before = int(time.time() * 1000)
    publish_raw(shared_node.redis_url, "spirit:events", orjson.dumps(message))
    [event] = await client.events(1)
    data = event["data"]
    assert event["channel"] == "spirit.notification"
    assert data["type"] == "spirit.notification"
    assert data["source"] == "spirit"
    assert data["payload"] == message
    assert data["version"] == "1.0"
    assert uuid.UUID(data["id"])
    assert before - 1000 <= data["timestamp"] <= int(time.time() * 1000) + 1000


async def test_legacy_object_with_its_own_id_and_type_is_wrapped_not_dropped(shared_node, connect):
    client = await subscribed(connect, shared_node, ["spirit.*"], token(uid("alice")))
    message = {"id": 981, "type": "state_change", "state": "idle"}
    publish_raw(shared_node.redis_url, "spirit:events", orjson.dumps(message))
    [event] = await client.events(1)
    assert event["channel"] == "spirit.notification"
    assert event["data"]["payload"] == message


async def test_legacy_message_with_a_user_id_is_private_to_that_user(shared_node, connect):
    alice, bob = uid("alice"), uid("bob")
    owner = await subscribed(connect, shared_node, ["spirit.*"], token(alice))
    other = await subscribed(connect, shared_node, ["spirit.*"], token(bob))
    message = {"userId": alice, "text": "your strategy paused"}
    publish_raw(shared_node.redis_url, "spirit:events", orjson.dumps(message))
    marker = {"text": "for everyone"}
    publish_raw(shared_node.redis_url, "spirit:events", orjson.dumps(marker))
    received = [e["data"]["payload"] for e in await owner.events(2)]
    assert received == [message, marker]
    [event] = await other.events(1)
    assert event["data"]["payload"] == marker


# --- malformed and expired events -------------------------------------------------------------


def malformed_messages() -> list[tuple[str, bytes]]:
    good = raw_envelope()
    missing = {k: v for k, v in raw_envelope().items() if k != "source"}
    too_big = raw_envelope(payload="x" * 70_000)
    return [
        ("events:order.filled", b"{not json"),
        ("events:order.filled", b"\xff\xfe\xfd"),
        ("events:order.filled", orjson.dumps([good])),
        ("events:order.filled", orjson.dumps(missing)),
        ("events:order.filled", orjson.dumps(raw_envelope(timestamp="yesterday"))),
        ("events:order.filled", orjson.dumps(raw_envelope(id=12345))),
        ("events:order.filled", orjson.dumps(raw_envelope(priority="urgent"))),
        ("events:order.filled", orjson.dumps(raw_envelope(userId=["alice"]))),
        ("events:order.filled", orjson.dumps(raw_envelope(version=1))),
        ("events:order.filled", orjson.dumps(too_big)),
        ("events:order.filled", orjson.dumps(raw_envelope("order.cancelled"))),
        ("events:order.filled:bad key!", orjson.dumps(raw_envelope())),
        ("events:NOT_A_TYPE", orjson.dumps(raw_envelope())),
        ("spirit:events", b"{{{"),
        ("spirit:events", b"\xff"),
    ]


async def test_malformed_envelopes_never_reach_clients_are_counted_and_the_node_keeps_delivering(shared_node, connect):
    admin = await subscribed(connect, shared_node, ["*"], token(uid("ops"), roles=["admin"]))
    dropped_before = shared_node.metric("events_dropped_total", 'reason="malformed"')
    bad = malformed_messages()
    for channel, data in bad:
        publish_raw(shared_node.redis_url, channel, data)
    good = publish(shared_node.redis_url, "order.filled", {"after": "malformed"})
    assert await events_until(admin, good) == []
    await async_wait_until(
        lambda: shared_node.metric("events_dropped_total", 'reason="malformed"') >= dropped_before + len(bad),
        timeout=5,
        message="events_dropped_total{reason=malformed} to count every malformed message",
    )
    assert shared_node.metric("events_dropped_total", 'reason="malformed"') == dropped_before + len(bad)
    assert any(line.get("event") == "malformed_event" for line in shared_node.log_lines()), "no log line"
    fresh = await subscribed(connect, shared_node, ["order.*"], token(uid("bob")))
    later = publish(shared_node.redis_url, "order.filled", {"still": "serving"})
    [event] = await fresh.events(1)
    assert event["data"] == later


async def test_event_past_its_ttl_is_never_delivered(shared_node, connect):
    alice = uid("alice")
    client = await subscribed(connect, shared_node, ["order.*"], token(alice))
    expired_before = shared_node.metric("events_dropped_total", 'reason="expired"')
    stale = raw_envelope(userId=alice, timestamp=int(time.time() * 1000) - 10_000, ttl=5_000)
    publish_raw(shared_node.redis_url, "events:order.filled", orjson.dumps(stale))
    fresh = raw_envelope(userId=alice, ttl=60_000)
    publish_raw(shared_node.redis_url, "events:order.filled", orjson.dumps(fresh))
    assert await events_until(client, fresh) == []
    assert shared_node.metric("events_dropped_total", 'reason="expired"') >= expired_before + 1


async def test_envelope_limit_is_configurable(start_node, connect):
    node = start_node(node_id="delivery-small-envelopes", PUSH_MAX_ENVELOPE_BYTES="2048")
    alice = uid("alice")
    client = await subscribed(connect, node, ["order.*"], token(alice))
    big = raw_envelope(userId=alice, payload="x" * 2048)
    publish_raw(node.redis_url, "events:order.filled", orjson.dumps(big))
    small = publish(node.redis_url, "order.filled", {"small": True}, user_id=alice)
    assert await events_until(client, small) == []
    assert node.metric("events_dropped_total", 'reason="malformed"') == 1
