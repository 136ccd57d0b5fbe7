"""The node's own WebSocket upgrade (node/wshandshake.py, node/front.py): which requests it takes,
and that everything else still reaches aiohttp (RFC 6455 §4.2)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.front import FrontProtocol
from node.wshandshake import accept_value, head_length, parse_upgrade

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_head(target: str = "/ws?token=abc", **extra: str) -> bytes:
    headers = {
        "Host": "node:8081",
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        **extra,
    }
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items() if v)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_the_accept_value_is_the_rfc_example():
    assert accept_value(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_valid_upgrade_gives_the_request_and_the_101():
    parsed = parse_upgrade(upgrade_head(Authorization="Bearer t", Origin="https://app"), "/ws")
    assert parsed is not None
    request, response = parsed
    assert request.query["token"] == "abc"
    assert request.headers["authorization"] == "Bearer t" and request.headers.get("Origin") == "https://app"
    assert response.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response


def test_what_is_not_a_valid_upgrade_of_ws_is_left_to_aiohttp():
    assert parse_upgrade(upgrade_head("/wss"), "/ws") is None
    assert parse_upgrade(upgrade_head("/healthz"), "/ws") is None
    assert parse_upgrade(upgrade_head(Upgrade=""), "/ws") is None
    assert parse_upgrade(upgrade_head(Connection="keep-alive"), "/ws") is None
    assert parse_upgrade(upgrade_head(**{"Sec-WebSocket-Version": "8"}), "/ws") is None
    assert parse_upgrade(upgrade_head(**{"Sec-WebSocket-Key": "short"}), "/ws") is None
    assert parse_upgrade(upgrade_head().replace(b"GET", b"POST", 1), "/ws") is None
    assert parse_upgrade(upgrade_head().replace(b"HTTP/1.1", b"HTTP/1.0", 1), "/ws") is None


def test_the_head_ends_at_the_blank_line():
    head = upgrade_head()
    assert head_length(head[:-1]) == -1
    assert head_length(head + b"\x81\x80") == len(head)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_heads_never_raise(data):
    parsed = parse_upgrade(b"GET /ws" + data + b"\r\n\r\n", "/ws")
    assert parsed is None or parsed[1].startswith(b"HTTP/1.1 101 ")


class Transport:
    def __init__(self) -> None:
        self.protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.transport: object = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


def front() -> tuple[FrontProtocol, Transport, Recorder, list[tuple]]:
    http, upgrades, transport = Recorder(), [], Transport()
    protocol = FrontProtocol(lambda: http, lambda *args: upgrades.append(args))
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, http, upgrades


def test_front_hands_other_requests_to_aiohttp_with_every_byte_read():
    protocol, transport, http, upgrades = front()
    protocol.data_received(b"GET /w")  # could still be /ws: wait
    assert transport.protocol is None
    protocol.data_received(b"s2 HTTP/1.1\r\n\r\n")  # another path: aiohttp's from here on
    assert transport.protocol is http and http.transport is transport
    assert http.data == b"GET /ws2 HTTP/1.1\r\n\r\n" and not upgrades


def test_front_hands_a_request_to_aiohttp_from_its_first_bytes_when_they_cannot_be_an_upgrade():
    protocol, transport, http, _ = front()
    protocol.data_received(b"GET /hea")
    assert transport.protocol is http and http.data == b"GET /hea"


def test_front_waits_for_the_whole_head_then_upgrades_and_passes_on_early_frames():
    protocol, transport, _, upgrades = front()
    head = upgrade_head()
    protocol.data_received(head[:20])
    assert not upgrades and transport.protocol is None
    protocol.data_received(head[20:] + b"\x81\x80")
    ((upgraded_transport, request, _, rest),) = upgrades
    assert upgraded_transport is transport and request.query["token"] == "abc" and rest == b"\x81\x80"


def test_front_gives_a_bad_upgrade_to_aiohttp_which_answers_400():
    protocol, transport, http, upgrades = front()
    protocol.data_received(upgrade_head(**{"Sec-WebSocket-Version": "8"}))
    assert transport.protocol is http and not upgrades
