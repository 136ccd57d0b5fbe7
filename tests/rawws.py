"""A bare WebSocket client on a plain socket, for clients that read slowly or never.

aiohttp's client reads its socket in the background, so it cannot play a client
that stops reading; this one only reads when told to.
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Any

import orjson

from cluster.wsframes import client_frame, frame_header


class RawWebSocket:
    def __init__(self, host: str, port: int, path: str = "/ws", recv_buffer: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def send_json(self, doc: dict[str, Any]) -> None:
        self.sock.sendall(client_frame(orjson.dumps(doc)))

    def recv_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame."""
        self.sock.settimeout(timeout)
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def recv_json(self, timeout: float = 5.0) -> dict[str, Any]:
        opcode, payload = self.recv_frame(timeout)
        if opcode != 1:
            raise ConnectionError(f"opcode {opcode}: {payload[:2].hex()}")
        return orjson.loads(payload)

    def _parse(self) -> tuple[int, bytes] | None:
        header = frame_header(self.buffer)
        if header is None:
            return None
        first, _, length, offset = header
        if len(self.buffer) < offset + length:
            return None
        data, self.buffer = self.buffer, self.buffer[offset + length :]
        return first & 0x0F, data[offset : offset + length]

    def close(self) -> None:
        self.sock.close()
