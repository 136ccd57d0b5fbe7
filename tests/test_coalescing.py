"""Small frames coalesced by the kernel (PUSH_TCP_NODELAY=false, opt-in): a connection turns
Nagle on after its welcome, and p0 events and replies are still pushed at once."""

from __future__ import annotations

import socket

import orjson

from cluster.auth import Identity
from cluster.channels import parse_pattern
from cluster.envelope import build_envelope
from cluster.settings import Settings
from node.connection import ClientConnection, Subscription
from node.hub import Hub


class RecordingSocket:
    def __init__(self) -> None:
        self.nodelay: list[int] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.nodelay.append(value)


class Transport:
    def __init__(self) -> None:
        self.sock = RecordingSocket()
        self.frames: list[bytes] = []

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.frames.extend(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def test_frames_go_out_at_once_unless_coalescing_is_asked_for():
    assert Settings().tcp_nodelay is True
    assert Settings.from_env({"PUSH_TCP_NODELAY": "false"}).tcp_nodelay is False


async def test_coalesce_turns_nagle_on_and_push_now_flushes_then_turns_it_back_on():
    transport = Transport()
    conn = ClientConnection("c", Identity("u", frozenset()), None, transport, Settings(), None)  # type: ignore[arg-type]
    conn.coalesce()
    assert conn.nagle and transport.sock.nodelay == [0]
    conn.push_now()
    assert transport.sock.nodelay == [0, 1, 0]


async def test_replies_are_pushed_at_once():
    transport = Transport()
    conn = ClientConnection("c", Identity("u", frozenset()), None, transport, Settings(), None)  # type: ignore[arg-type]
    conn.send_control('{"action":"pong"}')  # before coalesce: nothing to push
    assert transport.sock.nodelay == []
    conn.coalesce()
    conn.send_control('{"action":"pong"}')
    assert transport.sock.nodelay == [0, 1, 0]


async def test_p0_events_are_pushed_at_once_and_others_wait_for_the_kernel():
    hub = Hub("n", ["market"], 65536, None)
    transport = Transport()
    conn = ClientConnection("c", Identity("u", frozenset()), None, transport, Settings(), None)  # type: ignore[arg-type]
    hub.add(conn)
    hub.subscribe(conn, Subscription(parse_pattern("market.*"), 3, None))
    conn.coalesce()
    for priority in ("p2", "p0"):
        envelope = build_envelope("market.trades", {"n": 1}, source="exchange-connector", priority=priority)
        hub.on_bus_message(b"events:market.trades:BTC", orjson.dumps(envelope))
    assert len(transport.frames) == 2
    assert transport.sock.nodelay == [0, 1, 0], "only the p0 event was pushed"
