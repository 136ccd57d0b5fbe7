"""Fakes for in-process tests of the hot path: a transport that records frames, a WebSocket around it.

Only the edges are fake (the socket); the hub, the queue and the connection under test are the
real ones. ``buffered`` plays a client that stops reading: the connection sees a backed-up socket.
"""

from __future__ import annotations

import asyncio

import orjson

from cluster.wsframes import frame_header


class FakeTransport:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.writes = 0  # write / writelines calls: one per batch when the writer coalesces
        self.buffered = 0  # what the kernel would still hold: set it to play a client that does not read
        self.closed = False

    def write(self, data: bytes) -> None:
        self.frames.append(data)
        self.writes += 1

    def writelines(self, data: list[bytes]) -> None:
        self.frames.extend(data)
        self.writes += 1

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> object:
        return None

    def messages(self) -> list[dict]:
        """Every text frame written, decoded."""
        docs = []
        for frame in self.frames:
            header = frame_header(frame)
            if header is not None and header[0] & 0x0F == 1:
                docs.append(orjson.loads(frame[header[3] :]))
        return docs

    def events(self) -> list[dict]:
        return [doc for doc in self.messages() if doc.get("action") == "event"]


class FakeWebSocket:
    """What a connection calls on its WebSocket: close, and being told when the socket drains."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.drained = asyncio.Event()
        self.close_codes: list[int] = []

    async def wait_writable(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.drained.wait(), timeout)
        except TimeoutError:
            return False
        self.drained.clear()
        return True

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.close_codes.append(code)
        self.transport.closed = True

    def drain(self) -> None:
        """The client read everything: the socket is writable again."""
        self.transport.buffered = 0
        self.drained.set()
