"""Small frames coalesced by the kernel: with PUSH_TCP_NODELAY=false (the default) a connection
turns Nagle on after its welcome; with auto only while its reader is behind (node.backlog); p0
events and replies are pushed at once either way."""

from __future__ import annotations

import asyncio
import socket
import time

import orjson
import pytest

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


def test_coalescing_is_the_default_and_can_be_automatic_or_off():
    assert Settings().tcp_nodelay == "false"
    assert Settings.from_env({"PUSH_TCP_NODELAY": "0"}).tcp_nodelay == "false"
    assert Settings.from_env({"PUSH_TCP_NODELAY": "1"}).tcp_nodelay == "true"
    assert Settings.from_env({"PUSH_TCP_NODELAY": "Auto"}).tcp_nodelay == "auto"
    with pytest.raises(SystemExit, match="PUSH_TCP_NODELAY"):
        Settings.from_env({"PUSH_TCP_NODELAY": "sometimes"})


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


class SocketTransport(Transport):
    """A fake transport over a real, connected TCP socket (the kernel's queues are real)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.real = sock

    def get_extra_info(self, name: str) -> object:
        return self.real if name == "socket" else None


@pytest.fixture
def tcp_pair(request):
    """(server side, client side) of a loopback TCP connection whose client reads nothing yet
    (``@pytest.mark.parametrize("tcp_pair", [bytes], indirect=True)``: the client's SO_RCVBUF)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    if getattr(request, "param", None):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, request.param)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvloop leaves it
    listener.close()
    yield server, client
    server.close()
    client.close()


def nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_backlog_watch_coalesces_for_a_reader_behind_and_stops_once_it_caught_up(tcp_pair):
    from node.backlog import CAUGHT_UP_ROUNDS, socket_backlog, watch

    server, client = tcp_pair
    transport = SocketTransport(server)
    conn = ClientConnection("c", Identity("u", frozenset()), None, transport, Settings(), None)  # type: ignore[arg-type]
    watch(conn)
    assert not conn.nagle and nodelay(server), "a reader that keeps up gets one segment per frame"
    server.setblocking(False)
    try:
        while True:  # the client reads nothing: its window closes, then our send queue fills
            server.send(b"x" * 260)
    except BlockingIOError:
        pass
    unsent, _ = socket_backlog(transport)  # type: ignore[misc]
    assert unsent > 0
    watch(conn)
    assert conn.nagle and not nodelay(server), "a reader behind gets Nagle"
    client.setblocking(False)
    deadline = time.monotonic() + 5
    while socket_backlog(transport)[0] and time.monotonic() < deadline:  # type: ignore[index]  # it catches up
        try:
            client.recv(1 << 20)
        except BlockingIOError:
            time.sleep(0.001)
    for _ in range(CAUGHT_UP_ROUNDS - 1):
        watch(conn)
        assert conn.nagle, "one look caught up is not enough to switch back"
    watch(conn)
    assert not conn.nagle and nodelay(server), "caught up: frames go out at once again"


@pytest.mark.parametrize("tcp_pair", [32768], indirect=True)  # the bench's slow readers' buffer
async def test_frames_the_client_has_not_read_count_as_behind_before_our_socket_fills(tcp_pair):
    """A reader that pauses with room left in its buffer: nothing waits in our socket, but its
    advertised window shrinks by what it has not read."""
    from node.backlog import CAUGHT_UP_ROUNDS, UNREAD_BYTES, socket_backlog, watch

    server, client = tcp_pair
    transport = SocketTransport(server)
    conn = ClientConnection("c", Identity("u", frozenset()), None, transport, Settings(), None)  # type: ignore[arg-type]
    watch(conn)  # learns the client's window
    widest = conn.widest_window
    assert widest > 0 and not conn.nagle
    unread = max(UNREAD_BYTES, widest // 4) * 2
    assert unread < widest
    for _ in range(unread // 256):
        server.send(b"x" * 256)
    time.sleep(0.05)
    assert socket_backlog(transport)[0] == 0, "everything left our socket"  # type: ignore[index]
    watch(conn)
    assert conn.nagle, "the client holds unread frames: coalesce"
    client.setblocking(False)
    while True:
        try:
            client.recv(1 << 20)
        except BlockingIOError:
            break
    server.send(b"y")  # its ACK carries the reopened window
    time.sleep(0.05)
    for _ in range(CAUGHT_UP_ROUNDS):
        watch(conn)
    assert not conn.nagle, "read up: frames go out at once again"


async def test_the_backlog_of_a_closed_socket_is_unknown_and_the_watch_leaves_it_alone(tcp_pair):
    from node.backlog import socket_backlog, watch

    server, _ = tcp_pair
    transport = SocketTransport(server)
    conn = ClientConnection("c", Identity("u", frozenset()), None, transport, Settings(), None)  # type: ignore[arg-type]
    server.close()
    assert socket_backlog(transport) is None
    watch(conn)
    assert not conn.nagle


async def test_by_default_every_connection_coalesces_after_its_welcome(start_node, connect):
    from conftest import async_wait_until, publish

    node = start_node("coalesce-default")
    clients = [await connect(node) for _ in range(2)]
    await async_wait_until(lambda: node.metric("ws_coalescing_connections") == 2, timeout=5)
    for client in clients:
        await client.subscribe(["market.trades:COALESCE"])  # the ack is a reply: pushed at once
    sent = [
        publish(node.redis_url, "market.trades", {"n": n}, key="COALESCE", priority="p0" if n % 2 else "p2")
        for n in range(6)
    ]
    for client in clients:
        assert [e["data"]["id"] for e in await client.events(6)] == [e["id"] for e in sent]
    await clients[0].close()
    await async_wait_until(lambda: node.metric("ws_coalescing_connections") == 1, timeout=5)


async def test_auto_coalesces_only_for_the_reader_that_is_behind_and_loses_nothing(start_node, connect):
    """PUSH_TCP_NODELAY=auto, seen from outside: ws_coalescing_connections counts the reader
    that stopped reading, not the one that keeps up, and drops back once it caught up."""
    from conftest import async_wait_until
    from rawws import RawWebSocket
    from test_limits import envelope, publish_burst

    node = start_node("coalesce", PUSH_TCP_NODELAY="auto", PUSH_EVENTS_PER_SECOND="100000", PUSH_EVENTS_BURST="100000")
    behind = RawWebSocket("127.0.0.1", node.port, recv_buffer=65536)
    assert behind.recv_json()["action"] == "welcome"
    behind.send_json({"action": "subscribe", "channels": ["market.trades"], "id": "s"})
    assert behind.recv_json()["action"] == "ack"
    keeping_up = await connect(node)
    await keeping_up.subscribe(["market.trades"])
    assert node.metric("ws_coalescing_connections") == 0
    sent = [envelope("market.trades", {"n": n, "pad": "x" * 1000}) for n in range(300)]
    publish_burst(node.redis_url, [("market.trades", e) for e in sent])
    assert [e["data"]["id"] for e in await keeping_up.events(300)] == [e["id"] for e in sent]
    await async_wait_until(lambda: node.metric("ws_coalescing_connections") == 1, timeout=5, message="coalescing on")

    def read_all() -> list[str]:
        return [behind.recv_json()["data"]["id"] for _ in range(300)]

    assert await asyncio.to_thread(read_all) == [e["id"] for e in sent], "every event, in order"
    await async_wait_until(lambda: node.metric("ws_coalescing_connections") == 0, timeout=8, message="coalescing off")
    publish_burst(node.redis_url, [("market.trades", envelope("market.trades", {"after": True}))])
    assert (await asyncio.to_thread(behind.recv_json))["data"]["payload"] == {"after": True}
    behind.close()
