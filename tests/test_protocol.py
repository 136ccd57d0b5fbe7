"""The wire protocol of SPEC §4, byte-in, typed-message-out. Pure: no processes.

``parse_client_message`` turns one client text frame into a typed message or
raises :class:`ProtocolError` carrying the SPEC's error code and the request
id when one could be read; the builders produce the server messages.
"""

from __future__ import annotations

import orjson
import pytest

from cluster import protocol
from cluster.protocol import (
    Auth,
    CloseCode,
    ErrorCode,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    parse_client_message,
)


def parse(doc: object) -> protocol.ClientMessage:
    return parse_client_message(orjson.dumps(doc))


def refused(doc: object) -> ProtocolError:
    """The error for a frame carrying ``doc`` encoded as JSON."""
    return refused_frame(orjson.dumps(doc))


def refused_frame(data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(data)
    return info.value


# --- the SPEC's codes ----------------------------------------------------------------


def test_error_codes_are_the_spec_list():
    codes = {v for k, v in vars(ErrorCode).items() if not k.startswith("_")}
    assert codes == {
        "SNAPSHOT_LIMIT",  # issue 15: more state channels matched than PUSH_SNAPSHOT_MAX_CHANNELS
        "INVALID_JSON",
        "INVALID_MESSAGE",
        "UNKNOWN_ACTION",
        "INVALID_CHANNEL",
        "FORBIDDEN",
        "SUBSCRIPTION_LIMIT",
        "UNAUTHORIZED",
        "TOKEN_EXPIRED",
        "TOO_MANY_CONNECTIONS",
        "RATE_LIMITED",
        "INTERNAL",
    }


def test_close_codes_are_the_spec_list():
    assert (CloseCode.NORMAL, CloseCode.FLOODING, CloseCode.TOO_BIG, CloseCode.INTERNAL, CloseCode.RECONNECT) == (
        1000,
        1008,
        1009,
        1011,
        1012,
    )
    assert (
        CloseCode.UNAUTHORIZED,
        CloseCode.FORBIDDEN,
        CloseCode.SLOW_CONSUMER,
        CloseCode.TOO_MANY_CONNECTIONS,
    ) == (4001, 4003, 4008, 4029)


# --- client → server: valid messages --------------------------------------------------


def test_subscribe_with_options_and_id():
    message = parse(
        {
            "action": "subscribe",
            "channels": ["order.*", "market.ticker:BTC/USDT"],
            "options": {"priority": "p1", "limit": 20, "since": "e1:abc"},
            "id": "r1",
        }
    )
    assert message == Subscribe(("order.*", "market.ticker:BTC/USDT"), "r1", 1, 20.0, "e1:abc")


def test_subscribe_without_options():
    assert parse({"action": "subscribe", "channels": ["risk.alert"]}) == Subscribe(("risk.alert",))


def test_subscribe_channels_are_deduplicated_in_order():
    message = parse({"action": "subscribe", "channels": ["b.x", "a.x", "b.x"]})
    assert message.channels == ("b.x", "a.x")


def test_subscribe_channels_are_checked_later_not_by_the_parser():
    """A bad channel rejects that channel only (SPEC §4), so the parser keeps it for the node to judge."""
    assert parse({"action": "subscribe", "channels": ["not a channel", "order.*"]}).channels == (
        "not a channel",
        "order.*",
    )


def test_unsubscribe_with_id():
    assert parse({"action": "unsubscribe", "channels": ["order.*"], "id": "r2"}) == Unsubscribe(("order.*",), "r2")


def test_auth_carries_the_token():
    assert parse({"action": "auth", "token": "a.b.c"}) == Auth("a.b.c")


def test_ping():
    assert parse({"action": "ping"}) == Ping()
    assert parse({"action": "ping", "id": 7}) == Ping(7)


@pytest.mark.parametrize("request_id", ["r1", "", 0, -3, 2**53, "x" * 128])
def test_request_id_may_be_a_string_or_an_integer(request_id):
    assert parse({"action": "ping", "id": request_id}).id == request_id


def test_parser_accepts_str_and_bytes():
    assert parse_client_message('{"action":"ping"}') == parse_client_message(b'{"action":"ping"}')


def test_unknown_fields_are_ignored():
    assert parse({"action": "ping", "extra": {"x": 1}}) == Ping()


@pytest.mark.parametrize("limit", [1, 0.5, 1_000_000])
def test_subscribe_limit_is_a_positive_number(limit):
    assert parse({"action": "subscribe", "channels": ["a.b"], "options": {"limit": limit}}).limit == float(limit)


def test_subscribe_may_ask_for_fossil_deltas_and_no_snapshot():
    options = {"delta": "fossil", "snapshot": False}
    message = parse({"action": "subscribe", "channels": ["market.orderbook:BTC/USDT"], "options": options})
    assert (message.delta, message.snapshot) == ("fossil", False)
    assert parse({"action": "subscribe", "channels": ["a.b"]}).delta is None


def test_subscribe_options_may_be_empty_or_null():
    assert parse({"action": "subscribe", "channels": ["a.b"], "options": {}}) == Subscribe(("a.b",))
    assert parse({"action": "subscribe", "channels": ["a.b"], "options": None}) == Subscribe(("a.b",))


# --- client → server: refused messages ------------------------------------------------


@pytest.mark.parametrize("data", ["", "{", "not json", b"\xff\xfe", "{'action': 'ping'}", '{"action":"ping"} x'])
def test_frame_that_is_not_json_is_invalid_json(data):
    assert refused_frame(data).code == ErrorCode.INVALID_JSON


@pytest.mark.parametrize("doc", [[], [{"action": "ping"}], "ping", 1, None, True])
def test_frame_that_is_not_an_object_is_invalid_message(doc):
    assert refused(doc).code == ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize("doc", [{}, {"action": None}, {"action": 1}, {"action": ["ping"]}, {"id": "r"}])
def test_frame_without_a_string_action_is_invalid_message(doc):
    assert refused(doc).code == ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize("action", ["dance", "Subscribe", "PING", "", "publish"])
def test_unknown_action_is_unknown_action_with_the_request_id(action):
    error = refused({"action": action, "id": "r9"})
    assert error.code == ErrorCode.UNKNOWN_ACTION
    assert error.request_id == "r9"


@pytest.mark.parametrize("action", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("channels", [None, [], "order.*", {"order.*": 1}, [1], ["a.b", None], [["a.b"]]])
def test_channels_must_be_a_non_empty_list_of_strings(action, channels):
    doc = {"action": action, "id": "r3"}
    if channels is not None:
        doc["channels"] = channels
    error = refused(doc)
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert error.request_id == "r3"


def test_at_most_100_channels_per_message():
    assert parse({"action": "subscribe", "channels": [f"a.b:{i}" for i in range(100)]})
    assert refused({"action": "subscribe", "channels": [f"a.b:{i}" for i in range(101)]}).code == (
        ErrorCode.INVALID_MESSAGE
    )


@pytest.mark.parametrize(
    "options",
    [
        [],
        "p1",
        {"priority": "p4"},
        {"priority": "P1"},
        {"priority": 1},
        {"limit": 0},
        {"limit": -1},
        {"limit": "20"},
        {"limit": True},
        {"limit": 10_000_001},
        {"since": ""},
        {"since": 5},
        {"since": "c" * 513},
        {"snapshot": 0},
        {"snapshot": "false"},
    ],
)
def test_bad_subscribe_options_are_invalid_message(options):
    error = refused({"action": "subscribe", "channels": ["a.b"], "options": options, "id": "r4"})
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert error.request_id == "r4"


@pytest.mark.parametrize("delta", ["Fossil", "zstd", "gzip", "", True, 0, ["fossil"], {"format": "fossil"}])
def test_a_bad_delta_option_is_noted_not_refused(delta):
    """docs/DELTA.md: INVALID_MESSAGE for the subscription it applies to only; the node refuses the
    state-channel patterns and subscribes the others, so the parser keeps the message."""
    message = parse({"action": "subscribe", "channels": ["a.b"], "options": {"delta": delta}, "id": "r4"})
    assert isinstance(message, protocol.Subscribe)
    assert (message.invalid_delta, message.delta) == (True, None)


@pytest.mark.parametrize("token", [None, "", 5, ["a.b.c"], "t" * 8193])
def test_auth_needs_a_token_string(token):
    doc = {"action": "auth"}
    if token is not None:
        doc["token"] = token
    assert refused(doc).code == ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize("request_id", [1.5, True, ["r"], {"r": 1}, "x" * 129])
def test_request_id_of_another_kind_is_invalid_message(request_id):
    assert refused({"action": "ping", "id": request_id}).code == ErrorCode.INVALID_MESSAGE


# --- server → client ---------------------------------------------------------------------


def test_welcome_message_fields():
    doc = orjson.loads(protocol.welcome("c1", "node-1", None, None, {"maxSubscriptions": 50}))
    assert doc == {
        "action": "welcome",
        "connectionId": "c1",
        "node": "node-1",
        "userId": None,
        "expiresAt": None,
        "limits": {"maxSubscriptions": 50},
    }


def test_ack_message_fields():
    doc = orjson.loads(protocol.ack("r1", subscribed=["order.*"]))
    assert doc == {"action": "ack", "subscribed": ["order.*"], "unsubscribed": [], "id": "r1"}
    doc = orjson.loads(protocol.ack(None, unsubscribed=["order.*"], recovered={"order.*": False}))
    assert doc["unsubscribed"] == ["order.*"]
    assert doc["recovered"] == {"order.*": False}
    assert doc["id"] is None


def test_error_message_fields():
    doc = orjson.loads(protocol.error("INVALID_CHANNEL", "bad", "r1", ["x"]))
    assert doc == {"action": "error", "code": "INVALID_CHANNEL", "message": "bad", "channels": ["x"], "id": "r1"}


def test_event_message_embeds_the_envelope_bytes():
    envelope = b'{"id":"1","payload":{"price":1.10,"s":"\\u00fc"}}'
    doc = orjson.loads(protocol.event_frame("market.ticker:BTC/USDT", envelope, "e:1"))
    assert doc["action"] == "event"
    assert doc["channel"] == "market.ticker:BTC/USDT"
    assert doc["data"] == orjson.loads(envelope)
    assert doc["cursor"] == "e:1"
    assert envelope in protocol.event_frame("market.ticker:BTC/USDT", envelope, "e:1")


def test_authenticated_pong_lagged_reconnect_messages():
    assert orjson.loads(protocol.authenticated("alice", 123, "r5")) == {
        "action": "authenticated",
        "userId": "alice",
        "expiresAt": 123,
        "id": "r5",
    }
    assert orjson.loads(protocol.pong()) == {"action": "pong"}
    assert orjson.loads(protocol.pong("p1")) == {"action": "pong", "id": "p1"}
    assert orjson.loads(protocol.lagged(3, "queue_full")) == {"action": "lagged", "dropped": 3, "reason": "queue_full"}
    assert orjson.loads(protocol.reconnect("rebalance")) == {"action": "reconnect", "reason": "rebalance"}


# --- the client side: builders the server accepts, one parser for what the server says ---------


def test_client_builders_are_what_the_server_parses() -> None:
    message = protocol.parse_client_message(
        protocol.subscribe_request(["order.*", "market.ticker:BTC/USDT"], "r1", priority="p1", limit=20, since="e:@1-2")
    )
    assert message == protocol.Subscribe(("order.*", "market.ticker:BTC/USDT"), "r1", 1, 20.0, "e:@1-2")
    assert protocol.parse_client_message(protocol.subscribe_request(["risk.*"])) == protocol.Subscribe(("risk.*",))
    assert protocol.parse_client_message(
        protocol.subscribe_request(["market.orderbook:*"], "r2", snapshot=False, delta="fossil")
    ) == protocol.Subscribe(("market.orderbook:*",), "r2", snapshot=False, delta="fossil")
    assert protocol.parse_client_message(protocol.unsubscribe_request(["risk.*"], 7)) == protocol.Unsubscribe(
        ("risk.*",), 7
    )
    assert protocol.parse_client_message(protocol.auth_request("t0k", "a")) == protocol.Auth("t0k", "a")
    assert protocol.parse_client_message(protocol.ping_request()) == protocol.Ping()


def test_server_messages_parse_into_their_types() -> None:
    event = protocol.parse_server_message(protocol.event_frame("order.filled", b'{"id":"e1","priority":"p0"}', "c1"))
    assert isinstance(event, protocol.Event)
    assert (event.channel, event.event_id, event.cursor) == ("order.filled", "e1", "c1")
    ack = protocol.parse_server_message(protocol.ack("r1", ["a.*"], recovered={"a.*": False, "b.*": True}, cursor="x"))
    assert isinstance(ack, protocol.Ack)
    assert (ack.id, ack.subscribed, ack.unrecovered, ack.cursor) == ("r1", ("a.*",), ["a.*"], "x")
    welcome = protocol.parse_server_message(protocol.welcome("c-1", "node-1", "u1", 5, {}))
    assert isinstance(welcome, protocol.Welcome) and (welcome.node, welcome.user_id, welcome.expires_at) == (
        "node-1",
        "u1",
        5,
    )
    error = protocol.parse_server_message(protocol.error("FORBIDDEN", "no", "r2", ["risk.*"]))
    assert isinstance(error, protocol.ErrorMessage) and (error.code, error.id, error.channels) == (
        "FORBIDDEN",
        "r2",
        ("risk.*",),
    )
    lagged = protocol.parse_server_message(protocol.lagged(3, "queue_full"))
    assert isinstance(lagged, protocol.Lagged) and (lagged.dropped, lagged.reason) == (3, "queue_full")
    assert isinstance(protocol.parse_server_message(protocol.reconnect("bye")), protocol.Reconnect)
    assert isinstance(protocol.parse_server_message(protocol.authenticated("u1", 9)), protocol.Authenticated)
    future = protocol.parse_server_message(b'{"action":"snapshot","x":1}')  # a newer server: passed on, not refused
    assert type(future) is protocol.ServerMessage and future.doc["x"] == 1


def test_a_delta_channel_event_keeps_its_data_string_and_says_whether_it_is_a_delta() -> None:
    """docs/DELTA.md: ``data`` is a JSON string (the envelope's text, or a Fossil delta), ``delta`` says which."""
    envelope = '{"id":"e1","type":"market.orderbook","payload":{"s":"\u00fc"}}'
    frame = orjson.dumps(
        {"action": "event", "channel": "market.orderbook:X", "delta": False, "data": envelope, "cursor": "c", "seq": 4}
    )
    event = protocol.parse_server_message(frame)
    assert isinstance(event, protocol.Event)
    assert (event.delta, event.text, event.data, event.seq) == (False, envelope, None, 4)
    doc = {"action": "event", "channel": "market.orderbook:X", "delta": True, "data": "3\n3:abc0;", "cursor": "d"}
    delta = protocol.parse_server_message(orjson.dumps({**doc, "seq": 5}))
    assert isinstance(delta, protocol.Event) and (delta.delta, delta.text, delta.data) == (True, "3\n3:abc0;", None)
    plain = protocol.parse_server_message(protocol.event_frame("market.orderbook:X", envelope.encode(), "c", 4))
    assert isinstance(plain, protocol.Event) and (plain.delta, plain.text) == (None, None)


@pytest.mark.parametrize("frame", [b"not json", b"[1]", b'{"no":"action"}', b'{"action":7}'])
def test_a_server_frame_that_is_not_a_message_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_server_message(frame)
