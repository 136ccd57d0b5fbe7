"""WebSocket protocol heartbeat (PUSH_WS_HEARTBEAT): the node pings every connection once per
interval and drops a client that stays silent; pings from clients are answered."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from conftest import async_wait_until
from rawws import RawWebSocket


def frames_until_closed(ws: RawWebSocket, timeout: float) -> tuple[list[int], bool]:
    """Opcodes received until the server drops the socket (True) or ``timeout`` passes (False)."""
    opcodes: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            opcode, _ = ws.recv_frame(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            continue
        except (ConnectionError, EOFError, OSError):
            return opcodes, True
        opcodes.append(opcode)
    return opcodes, False


async def test_a_client_that_never_answers_pings_is_dropped(start_node):
    node = start_node(node_id="heartbeat-silent", PUSH_WS_HEARTBEAT="0.5")
    ws = RawWebSocket("127.0.0.1", node.port)
    try:
        assert ws.recv_json()["action"] == "welcome"
        opcodes, dropped = await asyncio.to_thread(frames_until_closed, ws, 5.0)
        assert 0x9 in opcodes, "the node sent protocol pings"
        assert dropped, "a client that answers no ping is dropped within a few intervals"
    finally:
        ws.close()
    await async_wait_until(lambda: node.metric("ws_connections_total") == 0, message="the connection to be gone")


async def test_a_client_that_answers_pings_stays_and_gets_its_own_pings_answered(start_node):
    node = start_node(node_id="heartbeat-alive", PUSH_WS_HEARTBEAT="0.5")
    async with aiohttp.ClientSession() as session, session.ws_connect(node.url, autoping=True) as ws:
        received: asyncio.Queue = asyncio.Queue()

        async def read() -> None:  # a reading client: aiohttp answers pings as it reads
            async for msg in ws:
                received.put_nowait(msg)

        reader = asyncio.create_task(read())
        try:
            assert orjson.loads((await received.get()).data)["action"] == "welcome"
            await ws.ping(b"are-you-there")
            await asyncio.sleep(2.5)  # five heartbeat intervals
            assert not ws.closed, f"closed with {ws.close_code}"
            await ws.send_json({"action": "ping", "id": "app"})
            reply = await asyncio.wait_for(received.get(), 2)
            assert orjson.loads(reply.data) == {"action": "pong", "id": "app"}
        finally:
            reader.cancel()


def test_a_clients_protocol_ping_gets_a_pong_with_its_payload(shared_node):
    ws = RawWebSocket("127.0.0.1", shared_node.port)
    try:
        assert ws.recv_json()["action"] == "welcome"
        mask = b"\x01\x02\x03\x04"
        payload = b"hello"
        ws.sock.sendall(bytes((0x89, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        assert ws.recv_frame() == (0xA, payload)
        ws.send_json({"action": "ping", "id": "after"})
        assert ws.recv_json() == {"action": "pong", "id": "after"}
    finally:
        ws.close()


def test_a_client_that_keeps_talking_sees_no_protocol_pings(start_node):
    """Only a connection quiet for a whole interval is pinged, as with aiohttp's heartbeat."""
    node = start_node(node_id="heartbeat-talking", PUSH_WS_HEARTBEAT="0.5")
    ws = RawWebSocket("127.0.0.1", node.port)
    try:
        assert ws.recv_json()["action"] == "welcome"
        opcodes = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            ws.send_json({"action": "ping", "id": "app"})
            opcodes.append(ws.recv_frame()[0])
            time.sleep(0.15)
        assert opcodes and set(opcodes) == {0x1}, f"only text frames (the app pongs): {sorted(set(opcodes))}"
    finally:
        ws.close()
