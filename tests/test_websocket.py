"""The node's own WebSocket (node/front.py, node/websocket.py) against a real node: RFC 6455
rules on client frames give their close codes, the close handshake is answered, and requests
that are not a first-request upgrade still reach aiohttp."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

from rawws import RawWebSocket

from cluster.wsframes import OP_CLOSE, OP_TEXT


def masked(opcode: int, payload: bytes, *, mask: bool = True) -> bytes:
    assert len(payload) < 126
    if not mask:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_code_after(node, frame: bytes) -> int:
    """The code of the close frame the node answers ``frame`` with (after the welcome)."""
    ws = RawWebSocket("127.0.0.1", node.port)
    try:
        assert ws.recv_json()["action"] == "welcome"
        ws.sock.sendall(frame)
        while True:
            opcode, payload = ws.recv_frame()
            if opcode == OP_CLOSE:
                return int.from_bytes(payload[:2], "big")
    finally:
        ws.close()


async def test_an_unmasked_client_frame_closes_1002(shared_node):
    assert await asyncio.to_thread(close_code_after, shared_node, masked(OP_TEXT, b'{"action":"ping"}', mask=False)) == 1002


async def test_a_text_frame_that_is_not_utf8_closes_1007(shared_node):
    assert await asyncio.to_thread(close_code_after, shared_node, masked(OP_TEXT, b'{"action":"\xff"}')) == 1007


async def test_a_reserved_opcode_closes_1002(shared_node):
    assert await asyncio.to_thread(close_code_after, shared_node, masked(0x3, b"")) == 1002


def close_handshake(node) -> tuple[int, bool]:
    ws = RawWebSocket("127.0.0.1", node.port)
    try:
        assert ws.recv_json()["action"] == "welcome"
        ws.sock.sendall(masked(OP_CLOSE, (4000).to_bytes(2, "big") + b"bye"))
        opcode, payload = ws.recv_frame()
        assert opcode == OP_CLOSE
        ws.sock.settimeout(5)
        return int.from_bytes(payload[:2], "big"), ws.sock.recv(10) == b""
    finally:
        ws.close()


async def test_a_client_close_is_answered_with_its_code_and_the_node_closes_the_socket(shared_node):
    code, eof = await asyncio.to_thread(close_handshake, shared_node)
    assert code == 4000 and eof


def request(sock: socket.socket, text: str) -> bytes:
    sock.sendall(text.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the node closed the connection"
        data += chunk
    return data


def upgrade_after_healthz(node) -> tuple[bytes, bytes, dict]:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    try:
        health = request(sock, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n\r\n")
        head, _, body = health.partition(b"\r\n\r\n")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1])
        while len(body) < length:
            body += sock.recv(65536)
        key = base64.b64encode(os.urandom(16)).decode()
        upgraded = request(
            sock,
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        head, _, rest = upgraded.partition(b"\r\n\r\n")
        ws = object.__new__(RawWebSocket)  # the frame reader of a raw client, on this socket
        ws.sock, ws.buffer = sock, rest
        return health.split(b"\r\n", 1)[0], head.split(b"\r\n", 1)[0], ws.recv_json()
    finally:
        sock.close()


async def test_an_upgrade_after_another_request_on_a_keep_alive_connection_is_served(shared_node):
    health, upgraded, welcome = await asyncio.to_thread(upgrade_after_healthz, shared_node)
    assert b" 200 " in health and b" 101 " in upgraded
    assert welcome.get("action") == "welcome"


def plain_get(node) -> bytes:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        return request(sock, f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nConnection: close\r\n\r\n")


async def test_a_plain_get_of_ws_is_still_a_bad_request(shared_node):
    assert b" 400 " in (await asyncio.to_thread(plain_get, shared_node)).split(b"\r\n", 1)[0]
