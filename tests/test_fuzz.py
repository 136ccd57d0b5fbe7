"""Fuzzing the two parsers that read untrusted input (issue 2, "Bad input").

``parse_client_message`` reads every client frame and ``parse_envelope`` /
``wrap_legacy`` read everything on the bus. Whatever they are fed — arbitrary
bytes, arbitrary text, arbitrary JSON, messages one mutation away from valid —
they may only return a well-formed value or raise the project's own error
(:class:`ProtocolError`, :class:`EnvelopeError`): anything else would reach the
node's I/O loop as an unexpected exception.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import protocol
from cluster.envelope import TYPE_RE, Envelope, EnvelopeError, parse_envelope, wrap_legacy
from cluster.protocol import Auth, ErrorCode, Ping, ProtocolError, Subscribe, Unsubscribe, parse_client_message

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ERROR_CODES = {v for k, v in vars(ErrorCode).items() if not k.startswith("_")}

# --- strategies ---------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates included
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)

MISSING = object()

channel_like = st.one_of(
    st.sampled_from(["*", "order.*", "risk.alert", "market.ticker:BTC/USDT", "market.*:*", "a.b:" + "x" * 129]),
    any_text,
)


def mutated(valid: Any, *alternatives: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Either the valid value, an arbitrary JSON value, one of ``alternatives``, or the field left out."""
    return st.one_of(st.just(valid), json_values, st.just(MISSING), *alternatives)


def near_valid(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not MISSING})


client_messages = st.one_of(
    near_valid(
        {
            "action": mutated("subscribe", st.sampled_from(["unsubscribe", "auth", "ping", "Subscribe"])),
            "channels": mutated(["order.*"], st.lists(channel_like, max_size=5), st.lists(json_values, max_size=3)),
            "options": mutated(
                {"priority": "p1", "limit": 20, "since": "e:1"},
                near_valid(
                    {
                        "priority": mutated("p1", st.sampled_from(["p0", "p3", "p4", "P1"])),
                        "limit": mutated(20, st.floats(), st.integers()),
                        "since": mutated("e:1", any_text),
                    }
                ),
            ),
            "id": mutated("r1", st.integers(), any_text, st.floats()),
        }
    ),
    near_valid(
        {
            "action": mutated("auth", st.sampled_from(["subscribe", "ping"])),
            "token": mutated("a.b.c", any_text, st.text(min_size=8000, max_size=8300)),
            "id": mutated(1, st.integers()),
        }
    ),
    near_valid({"action": mutated("ping"), "id": mutated(None, any_text)}),
)


def envelope_fields() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "id": mutated(str(uuid.uuid4()), any_text, st.uuids().map(str)),
        "type": mutated("order.filled", any_text, st.sampled_from(["a.b", "A.b", "a.b.c", "a", "spirit.x"])),
        "source": mutated("order-executor", any_text, st.sampled_from(["spirit", "x-", "-x", "a" * 65])),
        "timestamp": mutated(1_700_000_000_000, st.integers(), st.floats()),
        "version": mutated("1.0", st.sampled_from(["1", "2.0", "1.0 "])),
        "payload": mutated({"x": 1}),
        "userId": mutated("alice", any_text, st.just("u" * 257)),
        "sessionId": mutated("s1", any_text),
        "priority": mutated("p1", st.sampled_from(["p0", "p3", "p4", ""])),
        "ttl": mutated(1000, st.integers(), st.floats()),
        "correlationId": mutated("c1", any_text),
    }


envelopes = near_valid(envelope_fields())


def encode(doc: Any) -> bytes | None:
    try:
        return orjson.dumps(doc)
    except (orjson.JSONEncodeError, TypeError):
        return None


# --- checks --------------------------------------------------------------------------


def check_client_message(data: str | bytes) -> None:
    try:
        message = parse_client_message(data)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES
        assert isinstance(exc.message, str) and exc.message
        assert exc.request_id is None or type(exc.request_id) in (str, int)
        orjson.loads(protocol.error(exc.code, exc.message, exc.request_id))  # the reply can always be sent
        return
    assert isinstance(message, (Subscribe, Unsubscribe, Auth, Ping))
    assert message.id is None or type(message.id) in (str, int)
    if isinstance(message, (Subscribe, Unsubscribe)):
        assert isinstance(message.channels, tuple)
        assert 1 <= len(message.channels) <= protocol.MAX_CHANNELS_PER_MESSAGE
        assert all(type(c) is str for c in message.channels)
        assert len(set(message.channels)) == len(message.channels)
    if isinstance(message, Subscribe):
        assert message.priority in (None, 0, 1, 2, 3)
        assert message.limit is None or (type(message.limit) is float and message.limit > 0)
        assert message.since is None or (type(message.since) is str and message.since)
    if isinstance(message, Auth):
        assert type(message.token) is str and message.token


def check_envelope(result: Envelope, data: bytes) -> None:
    assert isinstance(result, Envelope)
    assert TYPE_RE.match(result.type)
    assert result.priority in (0, 1, 2, 3)
    assert type(result.timestamp) is int
    assert result.expires_at is None or result.expires_at >= result.timestamp
    assert result.user_id is None or type(result.user_id) is str
    frame = protocol.event_frame(result.type, result.raw, "e:1")
    assert orjson.loads(frame)["data"] == orjson.loads(result.raw)  # the raw bytes embed into a valid frame


def check_parse_envelope(data: bytes) -> None:
    try:
        result = parse_envelope(data)
    except EnvelopeError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return
    assert result.raw == data
    check_envelope(result, data)


def check_legacy(message: Any, data: bytes) -> None:
    try:
        result = wrap_legacy(message, data)
    except EnvelopeError:
        return
    check_envelope(result, result.raw)


# --- the client frame parser -----------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_client_parser_on_arbitrary_bytes(data):
    check_client_message(data)


@FUZZ
@given(any_text)
def test_client_parser_on_arbitrary_text(text):
    check_client_message(text)
    check_client_message(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(json_values)
def test_client_parser_on_arbitrary_json(doc):
    check_client_message(orjson.dumps(doc))


@FUZZ
@given(json_objects, st.sampled_from(["subscribe", "unsubscribe", "auth", "ping", "x"]))
def test_client_parser_on_arbitrary_objects_with_an_action(doc, action):
    doc["action"] = action
    check_client_message(orjson.dumps(doc))


@FUZZ
@given(client_messages)
def test_client_parser_on_near_valid_messages(doc):
    data = encode(doc)
    if data is not None:
        check_client_message(data)


@FUZZ
@given(client_messages, st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=3))
def test_client_parser_on_corrupted_valid_frames(doc, position, junk):
    data = encode(doc)
    if data is not None:
        position %= len(data) + 1
        check_client_message(data[:position] + junk + data[position + len(junk) :])


@FUZZ
@given(
    st.sampled_from(["id", "limit", "ttl"]), st.sampled_from(["1" * 30, "-" + "9" * 25, "1e400", "-1e400", "1e-400"])
)
def test_client_parser_on_out_of_range_numbers(field, number):
    if field == "id":
        text = '{"action":"ping","id":' + number + "}"
    else:
        text = '{"action":"subscribe","channels":["a.b"],"options":{"limit":' + number + "}}"
    check_client_message(text)


@FUZZ
@given(st.integers(min_value=1, max_value=3000))
def test_client_parser_on_deep_nesting(depth):
    check_client_message('{"action":"subscribe","channels":' + "[" * depth + "]" * depth + "}")


# --- the envelope parser ------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_envelope_parser_on_arbitrary_bytes(data):
    check_parse_envelope(data)


@FUZZ
@given(json_values)
def test_envelope_parser_on_arbitrary_json(doc):
    check_parse_envelope(orjson.dumps(doc))


@FUZZ
@given(envelopes)
def test_envelope_parser_on_near_valid_envelopes(doc):
    data = encode(doc)
    if data is not None:
        check_parse_envelope(data)


@FUZZ
@given(envelopes, st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=3))
def test_envelope_parser_on_corrupted_valid_envelopes(doc, position, junk):
    data = encode(doc)
    if data is not None:
        position %= len(data) + 1
        check_parse_envelope(data[:position] + junk + data[position + len(junk) :])


@FUZZ
@given(st.sampled_from(["timestamp", "ttl"]), st.sampled_from(["1" * 30, "-" + "9" * 25, "1e400", "1.0e3"]))
def test_envelope_parser_on_out_of_range_numbers(field, number):
    doc = {"id": str(uuid.uuid4()), "type": "a.b", "source": "s", "timestamp": 1, "version": "1.0", "payload": 1}
    text = orjson.dumps(doc).decode()[:-1] + f',"{field}":{number}}}'
    check_parse_envelope(text.encode())


@FUZZ
@given(st.one_of(json_values, envelopes))
def test_legacy_wrapper_on_arbitrary_json(message):
    data = encode(message)
    if data is not None:
        check_legacy(orjson.loads(data), data)
