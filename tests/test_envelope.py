"""The event envelope of SPEC §2: validation on the node side, strictness in the SDK.

Pure: no processes. A node accepts any well-formed envelope (forward
compatibility) and refuses malformed ones with :class:`EnvelopeError`; the
publisher SDK additionally refuses unknown types and services unless told
otherwise, and never builds what a node would drop.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import pytest

from cluster.envelope import (
    KNOWN_SERVICES,
    KNOWN_TYPES,
    EnvelopeError,
    build_envelope,
    parse_envelope,
    wrap_legacy,
)
from cluster.events import EventPublisher, SyncEventPublisher, prepare

SPEC_TYPES = {
    "order.created",
    "order.filled",
    "order.cancelled",
    "order.failed",
    "risk.alert",
    "risk.limit_reached",
    "risk.position_warning",
    "ai.insight_generated",
    "ai.analysis_complete",
    "ai.signal_detected",
    "strategy.created",
    "strategy.updated",
    "strategy.activated",
    "strategy.paused",
    "backtest.started",
    "backtest.progress",
    "backtest.completed",
    "backtest.failed",
    "market.ticker",
    "market.orderbook",
    "market.trades",
    "spirit.state_change",
    "spirit.notification",
}
SPEC_SERVICES = {
    "order-executor",
    "risk-manager",
    "nlp-processor",
    "signal-analyzer",
    "strategy-service",
    "backtest-engine",
    "market-data-collector",
    "exchange-connector",
}


def envelope(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": "order.filled",
        "source": "order-executor",
        "timestamp": int(time.time() * 1000),
        "version": "1.0",
        "payload": {"orderId": "o-1"},
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not DELETE}


DELETE = object()


def raw(doc: Any) -> bytes:
    return orjson.dumps(doc)


def rejected(doc: Any) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(raw(doc))
    return info.value


# --- the known vocabulary ----------------------------------------------------------


def test_the_23_known_types_are_exactly_the_spec_list():
    assert set(KNOWN_TYPES) == SPEC_TYPES
    assert len(KNOWN_TYPES) == 23


def test_the_8_known_services_are_exactly_the_spec_list():
    assert set(KNOWN_SERVICES) == SPEC_SERVICES


# --- a valid envelope -----------------------------------------------------------------


def test_valid_envelope_is_parsed_with_its_routing_fields():
    doc = envelope(userId="alice", sessionId="s-1", priority="p1", ttl=5000, correlationId="c-9")
    parsed = parse_envelope(raw(doc))
    assert parsed.id == doc["id"]
    assert parsed.type == "order.filled"
    assert parsed.domain == "order"
    assert parsed.source == "order-executor"
    assert parsed.timestamp == doc["timestamp"]
    assert parsed.user_id == "alice"
    assert parsed.session_id == "s-1"
    assert parsed.priority == 1
    assert parsed.expires_at == doc["timestamp"] + 5000


def test_envelope_bytes_are_kept_untouched_for_delivery():
    data = raw(envelope(correlationId="trace-1", payload={"nested": [1, 2.5, None, "ü"]}))
    assert parse_envelope(data).raw == data


def test_absent_priority_means_p2():
    assert parse_envelope(raw(envelope())).priority == 2


@pytest.mark.parametrize("priority,rank", [("p0", 0), ("p1", 1), ("p2", 2), ("p3", 3)])
def test_priority_p0_to_p3_are_accepted(priority, rank):
    assert parse_envelope(raw(envelope(priority=priority))).priority == rank


def test_absent_ttl_means_the_event_never_expires():
    assert parse_envelope(raw(envelope())).expires_at is None


def test_payload_may_be_any_json_value():
    for payload in (None, 0, "text", [1, "a"], {"a": {"b": []}}, True, 1.5):
        assert parse_envelope(raw(envelope(payload=payload))).raw


def test_unknown_type_and_source_are_accepted_by_nodes_for_forward_compatibility():
    parsed = parse_envelope(raw(envelope(type="portfolio.rebalanced", source="portfolio-service")))
    assert parsed.type == "portfolio.rebalanced"
    assert parsed.source == "portfolio-service"


def test_uppercase_uuid_is_a_uuid():
    assert parse_envelope(raw(envelope(id=str(uuid.uuid4()).upper())))


# --- malformed envelopes ----------------------------------------------------------------


def test_envelope_must_be_json():
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(b'{"id": "x", ')
    assert info.value.reason == "invalid_json"


def test_envelope_must_be_utf8():
    with pytest.raises(EnvelopeError):
        parse_envelope(b'{"id": "\xff\xfe"}')


@pytest.mark.parametrize("value", [[], "text", 1, None])
def test_envelope_must_be_a_json_object(value):
    assert rejected(value).reason == "not_object"


@pytest.mark.parametrize("field", ["id", "type", "source", "timestamp", "version", "payload"])
def test_required_field_missing_is_refused(field):
    rejected(envelope(**{field: DELETE}))


@pytest.mark.parametrize(
    "value", ["not-a-uuid", "", 42, None, "0000000-0000-0000-0000-000000000000", "{" + "0" * 35 + "}"]
)
def test_id_must_be_a_uuid_string(value):
    rejected(envelope(id=value))


@pytest.mark.parametrize(
    "value",
    [
        "order",
        "Order.filled",
        "order.Filled",
        "order.filled.now",
        "1order.filled",
        "order.",
        ".filled",
        "order-x.filled",
        "order.fil led",
        5,
        None,
    ],
)
def test_type_must_be_domain_dot_name(value):
    rejected(envelope(type=value))


@pytest.mark.parametrize("value", ["Order-executor", "-svc", "1svc", "svc_x", "svc x", "", 3, None, "a" * 65])
def test_source_must_be_a_service_name(value):
    rejected(envelope(source=value))


@pytest.mark.parametrize("value", [1.5, "1700000000000", None, True, -1, [1]])
def test_timestamp_must_be_integer_milliseconds(value):
    rejected(envelope(timestamp=value))


@pytest.mark.parametrize("value", ["1", "2.0", 1.0, None, ""])
def test_version_must_be_1_0(value):
    rejected(envelope(version=value))


@pytest.mark.parametrize("value", ["P0", "p4", "high", 0, "", True])
def test_priority_must_be_p0_to_p3(value):
    rejected(envelope(priority=value))


@pytest.mark.parametrize("value", [1.5, "1000", -1, True, [1]])
def test_ttl_must_be_integer_milliseconds(value):
    rejected(envelope(ttl=value))


@pytest.mark.parametrize("field", ["userId", "sessionId", "correlationId"])
@pytest.mark.parametrize("value", [1, "", ["u"], {"u": 1}, True, "x" * 257])
def test_optional_id_fields_must_be_strings(field, value):
    rejected(envelope(**{field: value}))


@pytest.mark.parametrize("field", ["userId", "sessionId", "priority", "ttl", "correlationId"])
def test_optional_field_null_means_absent(field):
    parse_envelope(raw(envelope(**{field: None})))


# --- size ----------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid envelope of exactly ``size`` bytes of JSON."""
    base = raw(envelope(payload=""))
    doc = envelope(payload="x" * (size - len(base)))
    data = raw(doc)
    assert len(data) == size
    return data


def test_envelope_of_64_kib_is_accepted():
    assert parse_envelope(padded(65536)).type == "order.filled"


def test_envelope_over_64_kib_is_refused():
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(padded(65537))
    assert info.value.reason == "too_large"


def test_envelope_size_limit_is_configurable():
    with pytest.raises(EnvelopeError):
        parse_envelope(padded(2000), max_bytes=1024)
    assert parse_envelope(padded(100_000), max_bytes=200_000)


# --- the publisher SDK ---------------------------------------------------------------


def test_sdk_builds_a_complete_valid_envelope():
    before = int(time.time() * 1000)
    doc = build_envelope(
        "order.filled",
        {"orderId": "o1"},
        source="order-executor",
        user_id="alice",
        priority="p1",
        ttl=1000,
        session_id="s1",
        correlation_id="c1",
    )
    after = int(time.time() * 1000)
    assert uuid.UUID(doc["id"])
    assert doc["type"] == "order.filled"
    assert doc["source"] == "order-executor"
    assert before <= doc["timestamp"] <= after
    assert doc["version"] == "1.0"
    assert doc["payload"] == {"orderId": "o1"}
    assert (doc["userId"], doc["sessionId"], doc["priority"], doc["ttl"], doc["correlationId"]) == (
        "alice",
        "s1",
        "p1",
        1000,
        "c1",
    )
    assert parse_envelope(orjson.dumps(doc)).user_id == "alice"


def test_sdk_omits_unset_optional_fields():
    doc = build_envelope("market.ticker", {"p": 1}, source="market-data-collector")
    assert set(doc) == {"id", "type", "source", "timestamp", "version", "payload"}


def test_sdk_gives_every_event_a_unique_id():
    ids = {build_envelope("risk.alert", {}, source="risk-manager")["id"] for _ in range(200)}
    assert len(ids) == 200


def test_sdk_refuses_unknown_type():
    with pytest.raises(EnvelopeError) as info:
        build_envelope("order.teleported", {}, source="order-executor")
    assert "order.teleported" in str(info.value)


def test_sdk_refuses_unknown_service():
    with pytest.raises(EnvelopeError) as info:
        build_envelope("order.filled", {}, source="rogue-service")
    assert "rogue-service" in str(info.value)


def test_sdk_publishes_unknown_type_and_service_when_allowed():
    doc = build_envelope("portfolio.rebalanced", {}, source="portfolio-service", allow_unknown=True)
    assert doc["type"] == "portfolio.rebalanced"
    assert doc["source"] == "portfolio-service"


def test_sdk_never_builds_what_a_node_would_drop_even_when_unknown_allowed():
    with pytest.raises(EnvelopeError):
        build_envelope("Not A Type", {}, source="order-executor", allow_unknown=True)
    with pytest.raises(EnvelopeError):
        build_envelope("order.filled", {}, source="order-executor", priority="urgent")
    with pytest.raises(EnvelopeError):
        build_envelope("order.filled", {}, source="order-executor", ttl=-5)


def test_sdk_publishers_refuse_unknown_service_unless_allowed():
    with pytest.raises(ValueError):
        SyncEventPublisher("redis://127.0.0.1:1/0", "rogue-service")
    with pytest.raises(ValueError):
        EventPublisher("redis://127.0.0.1:1/0", "rogue-service")
    SyncEventPublisher("redis://127.0.0.1:1/0", "rogue-service", allow_unknown=True).close()


def test_sdk_encodes_the_envelope_it_returns():
    _, doc, data = prepare("market.ticker", {"p": 1}, source="market-data-collector", key="BTC/USDT")
    assert orjson.loads(data) == doc
    assert parse_envelope(data).type == "market.ticker"


@pytest.mark.parametrize("key", ["", "has space", "a:b", "x" * 129, "ü"])
def test_sdk_refuses_an_invalid_channel_key(key):
    with pytest.raises(ValueError):
        prepare("market.ticker", {}, source="market-data-collector", key=key)


def test_sdk_refuses_an_envelope_over_64_kib():
    """The node drops envelopes over 64 KiB, so a publisher must learn about it first."""
    with pytest.raises(EnvelopeError):
        prepare("order.filled", "x" * 70_000, source="order-executor")


# --- legacy spirit:events -----------------------------------------------------------


def test_legacy_envelope_keeps_its_type():
    doc = envelope(type="spirit.state_change", source="signal-analyzer")
    wrapped = wrap_legacy(doc, raw(doc))
    assert wrapped.type == "spirit.state_change"
    assert wrapped.id == doc["id"]


@pytest.mark.parametrize("message", [{"text": "hello"}, "hello", [1, 2], 7, None, {"type": "not an envelope"}])
def test_legacy_other_json_is_wrapped_as_spirit_notification(message):
    wrapped = wrap_legacy(message, raw(message))
    doc = orjson.loads(wrapped.raw)
    assert wrapped.type == "spirit.notification"
    assert doc["type"] == "spirit.notification"
    assert doc["source"] == "spirit"
    assert doc["payload"] == message
    assert doc["version"] == "1.0"
    assert uuid.UUID(doc["id"])
    assert abs(doc["timestamp"] - time.time() * 1000) < 5000


@pytest.mark.parametrize(
    "message",
    [{"id": 17, "type": "state_change", "text": "hi"}, {"id": "x", "type": "spirit.state_change"}],
)
def test_legacy_object_with_id_and_type_that_is_not_an_envelope_is_wrapped(message):
    wrapped = wrap_legacy(message, raw(message))
    assert wrapped.type == "spirit.notification"
    assert orjson.loads(wrapped.raw)["payload"] == message


def test_legacy_message_with_user_id_stays_private():
    wrapped = wrap_legacy({"userId": "alice", "text": "hi"}, b"")
    assert wrapped.user_id == "alice"


def test_sdk_refuses_a_payload_that_is_not_json():
    with pytest.raises(EnvelopeError):
        prepare("order.filled", {"when": {1, 2}}, source="order-executor")
