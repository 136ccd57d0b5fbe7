"""A minimal, fast asyncio WebSocket client for the benchmark (RFC 6455 client side).

The benchmark has to read 100,000 frames per second on one core, so this is an
:class:`asyncio.Protocol` rather than a full client library: it upgrades, then
parses frame headers straight from the bytes ``data_received`` hands it. Event
frames are only counted; on "probe" connections the publisher's microsecond
send time (``"tsUs":`` followed by 16 digits, the first field of the payload) is
sliced out of the frame to measure latency — no JSON decoding per event.
Protocol messages that are not events (welcome, ack, lagged, error) are decoded.

It speaks to a delta-push node (``/ws``: welcome, then subscribe/ack, events
wrapped in ``{"action":"event",...}``) or to Nchan (every data frame is one
published message; subscribed as soon as the upgrade succeeds).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from array import array
from typing import Protocol

import orjson

from cluster.wsframes import client_frame, frame_header

TS_MARKER = b'"tsUs":'
TS_OFFSET = len(TS_MARKER)
TS_DIGITS = 16
EVENT_PREFIX = b'{"action":"event"'


class Stats:
    """Totals shared by every connection of one benchmark phase (one process, one thread)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.lagged = 0  # events the server reported dropped
        self.lagged_notices = 0  # lagged messages received
        self.errors: dict[str, int] = {}
        self.closed: dict[int | None, int] = {}
        self.latencies_us: array[int] = array("q")

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class Subscriber(Protocol):
    """What the bench needs of any client connection, fast or slow."""

    welcomed: asyncio.Future[float]
    subscribed: asyncio.Future[float]

    def close(self) -> None: ...


class BenchWebSocket(asyncio.Protocol):
    """One benchmark connection; ``welcomed`` and ``subscribed`` resolve as it comes up."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        stats: Stats,
        *,
        nchan: bool = False,
        subscribe: bytes | None = None,
        probe: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.stats = stats
        self.nchan = nchan
        self.subscribe_message = subscribe
        self.probe = probe
        self.welcomed: asyncio.Future[float] = loop.create_future()
        self.subscribed: asyncio.Future[float] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.delivered = 0
        self.close_code: int | None = None
        self._buf = b""

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed[self.close_code] = self.stats.closed.get(self.close_code, 0) + 1
        failure = ConnectionError(f"connection lost (close code {self.close_code})")
        for future in (self.welcomed, self.subscribed):
            if not future.done():
                future.set_exception(failure)
                future.exception()  # retrieved: a lost connection is counted, not raised later

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.upgraded:
            data = self._upgrade(data)
            if not data:
                return
        stats = self.stats
        n = len(data)
        pos = 0
        count = 0
        now_us = time.time_ns() // 1000 if self.probe else 0
        latencies = stats.latencies_us
        nchan = self.nchan
        while (header := frame_header(data, pos)) is not None:
            first, _, length, header_size = header
            start = pos + header_size
            end = start + length
            if end > n:
                break
            opcode = first & 0x0F
            if opcode == 1 or opcode == 2:
                if nchan or data.startswith(EVENT_PREFIX, start):
                    count += 1
                    if now_us:
                        i = data.find(TS_MARKER, start, end)
                        if i >= 0:
                            latencies.append(now_us - int(data[i + TS_OFFSET : i + TS_OFFSET + TS_DIGITS]))
                else:
                    self._message(data[start:end])
            elif opcode == 9:
                self._send(client_frame(data[start:end], 0xA))
            elif opcode == 8:
                self.close_code = int.from_bytes(data[start : start + 2], "big") if length >= 2 else None
                self._send(client_frame(data[start : start + 2], 0x8))
                if self.transport is not None:
                    self.transport.close()
                return
            pos = end
        if pos < n:
            self._buf = data[pos:]
        if count:
            self.delivered += count
            stats.delivered += count

    # --- helpers ------------------------------------------------------------------

    def _upgrade(self, data: bytes) -> bytes:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            if len(data) > 65536:
                self._fail("handshake too long")
            self._buf = data
            return b""
        status = data[: data.find(b"\r\n")]
        if b" 101 " not in status + b" ":
            self._fail(f"upgrade refused: {status[:80].decode(errors='replace')}")
            return b""
        self.upgraded = True
        if self.nchan:
            now = time.monotonic()
            self.welcomed.set_result(now)
            self.subscribed.set_result(now)
        return data[head_end + 4 :]

    def _message(self, payload: bytes) -> None:
        doc = orjson.loads(payload)
        action = doc.get("action")
        if action == "welcome":
            if not self.welcomed.done():
                self.welcomed.set_result(time.monotonic())
            if self.subscribe_message is None:
                if not self.subscribed.done():
                    self.subscribed.set_result(time.monotonic())
            else:
                self._send(client_frame(self.subscribe_message))
        elif action == "ack":
            if not self.subscribed.done():
                self.subscribed.set_result(time.monotonic())
        elif action == "lagged":
            self.stats.lagged += int(doc.get("dropped", 0))
            self.stats.lagged_notices += 1
        elif action == "error":
            self.stats.error(str(doc.get("code")))

    def _send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def _fail(self, reason: str) -> None:
        self.stats.error(reason)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close the TCP connection (the server sees the client leave)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def open_connection(
    host: str,
    port: int,
    path: str,
    stats: Stats,
    *,
    nchan: bool = False,
    subscribe: bytes | None = None,
    probe: bool = False,
) -> BenchWebSocket:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: BenchWebSocket(host, port, path, stats, nchan=nchan, subscribe=subscribe, probe=probe), host, port
    )
    return protocol
