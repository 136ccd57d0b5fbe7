"""node/deltas.py: which frame a connection gets, built once per channel version (docs/DELTA.md)."""

from __future__ import annotations

import random

import orjson
import pytest
from fossil_fixtures import next_book, order_book

from cluster import fossil, protocol
from cluster.channels import parse_pattern
from cluster.wsframes import frame_header
from node import deltas
from node.deltas import DeltaChannels, may_match_state

STATE_TYPES = ("market.ticker", "market.orderbook")


def envelopes(count: int) -> list[bytes]:
    rng = random.Random(1)
    books = [order_book(rng)]
    while len(books) < count:
        books.append(next_book(books[-1], rng))
    return [orjson.dumps({**b, "seq": i + 1}) for i, b in enumerate(books)]


def unframe(frame: bytes) -> dict:
    """The JSON of one server text frame."""
    header = frame_header(frame, 0)
    assert header is not None and header[2] + header[3] == len(frame)
    return orjson.loads(frame[header[3] :])


def test_a_delta_only_on_top_of_the_version_written_last_else_the_full_envelope_string() -> None:
    raws = envelopes(3)
    channels = DeltaChannels()
    first = channels.event("market.orderbook:X", raws[0], "c1", 1, "id-1")
    second = channels.event("market.orderbook:X", raws[1], "c2", 2, "id-2")
    full = unframe(first.frame_after(None))
    assert (full["delta"], full["data"].encode(), full["seq"], full["cursor"]) == (False, raws[0], 1, "c1")
    delta = unframe(second.frame_after(first.key))
    assert delta["delta"] is True and fossil.decode(raws[0], delta["data"].encode()) == raws[1]
    for stale in (None, (1, "another id"), (0, "id-0")):  # no base, or not the bytes the delta was made from
        assert unframe(second.frame_after(stale))["delta"] is False


def test_each_frame_is_built_once_for_every_recipient(monkeypatch: pytest.MonkeyPatch) -> None:
    raws = envelopes(2)
    channels = DeltaChannels()
    first = channels.event("market.orderbook:X", raws[0], "c1", 1, "id-1")
    second = channels.event("market.orderbook:X", raws[1], "c2", 2, "id-2")
    calls = []
    encode = fossil.encode
    monkeypatch.setattr(deltas.fossil, "encode", lambda a, b: calls.append(1) or encode(a, b))
    frames = {second.frame_after(first.key) for _ in range(100)} | {second.frame_after(None) for _ in range(100)}
    assert len(frames) == 2 and len(calls) == 1


def test_a_delta_that_is_not_smaller_is_sent_as_the_full_event() -> None:
    channels = DeltaChannels()
    first = channels.event("market.ticker:X", b'{"a":1,"seq":1}', "c", 1, "i1")
    second = channels.event("market.ticker:X", b'{"b":2,"seq":2}', "c", 2, "i2")  # tiny and unrelated
    assert unframe(second.frame_after(first.key))["delta"] is False


def test_previous_envelopes_are_bounded_and_a_late_older_one_does_not_replace_a_newer() -> None:
    channels = DeltaChannels(max_channels=3)
    for i in range(5):
        channels.event(f"market.ticker:K{i}", b"{}", "c", 1, f"i{i}")
    assert len(channels) == 3
    channels.event("market.ticker:K4", b'{"v":5}', "c", 5, "i5")
    late = channels.event("market.ticker:K4", b'{"v":3}', "c", 3, "i3")
    assert late.base_key is None
    assert channels.event("market.ticker:K4", b'{"v":6}', "c", 6, "i6").base_key == (5, "i5")


@pytest.mark.parametrize(
    ("pattern", "matches"),
    [
        ("market.orderbook:BTC/USDT", True),
        ("market.ticker:*", True),
        ("market.*", True),
        ("*", True),
        ("market.trades:X", False),
        ("order.*", False),
    ],
)
def test_a_delta_request_applies_to_patterns_that_can_match_a_state_channel(pattern: str, matches: bool) -> None:
    assert may_match_state(parse_pattern(pattern), STATE_TYPES) is matches


def test_the_delta_event_frame_is_the_documented_shape() -> None:
    frame = protocol.delta_event_frame("market.orderbook:X", b'"1\\n2:ab0;"', True, "cur", 9)
    assert orjson.loads(frame) == {
        "action": "event", "channel": "market.orderbook:X", "delta": True, "data": "1\n2:ab0;", "cursor": "cur", "seq": 9
    }  # fmt: skip


async def test_a_connection_remembers_a_bounded_number_of_delta_bases() -> None:
    """A wildcard delta subscription over many channels keeps at most MAX_DELTA_BASES versions
    per connection; a channel whose base was forgotten gets a full event, then deltas again."""
    from fakes import FakeTransport

    from cluster.auth import Identity
    from cluster.settings import Settings
    from node.connection import MAX_DELTA_BASES, ClientConnection

    conn = ClientConnection("c", Identity("u", frozenset()), None, FakeTransport(), Settings(), None)  # type: ignore[arg-type]
    raws = envelopes(2)
    channels = DeltaChannels(max_channels=MAX_DELTA_BASES + 10)
    names = [f"market.orderbook:K{n}" for n in range(MAX_DELTA_BASES + 1)]
    for name in names:
        conn.delta_frame(channels.event(name, raws[0], "c", 1, "id-1"))
    assert len(conn.delta_last) == MAX_DELTA_BASES and names[0] not in conn.delta_last
    assert unframe(conn.delta_frame(channels.event(names[-1], raws[1], "c", 2, "id-2")))["delta"] is True
    assert unframe(conn.delta_frame(channels.event(names[0], raws[1], "c", 2, "id-2")))["delta"] is False
