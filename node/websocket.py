"""One client's socket after the node's own upgrade: the I/O layer around :mod:`cluster.wsframes`.

Why not aiohttp's ``WebSocketResponse``: aiohttp keeps the parsed request, its
HTTP parser, a reader queue and a handler task alive for a WebSocket's whole
life (~14 KB per connection, docs/PERFORMANCE.md). This protocol keeps a frame
reader that holds nothing between frames, a small inbox and the transport.

It offers what the node's session uses of ``WebSocketResponse`` — ``receive()``,
``send_str()``, ``close(code=, message=)``, ``close_code`` — so that the session
serves both (aiohttp still answers upgrades that arrive on a keep-alive
connection after another request). Reading pauses while ``INBOX_LIMIT``
messages wait (the inbound rate limit closes floods long before). Writes go
straight to the transport; ``pause_writing``/``resume_writing`` tell the
connection's writer when the socket drains, instead of polling.
"""

from __future__ import annotations

import asyncio
from collections import deque

from cluster.wsframes import (
    CLOSE_NORMAL,
    MSG_CLOSED,
    MSG_ERROR,
    OP_CLOSE,
    FrameReader,
    Message,
    close_code_allowed,
    close_frame,
    text_frame,
)

INBOX_LIMIT = 32  # messages read but not yet served before the socket stops being read
CLOSE_TIMEOUT_SECONDS = 2.0  # how long a closing node waits for the client's close frame
_CLOSED = Message(MSG_CLOSED, 0, "")


class WebSocket(asyncio.Protocol):
    """A server-side WebSocket on a transport whose upgrade is done."""

    __slots__ = (
        "transport",
        "_reader",
        "_inbox",
        "_waiter",
        "_read_paused",
        "_close_sent",
        "_lost",
        "_lost_waiter",
        "_writable",
        "close_code",
    )

    def __init__(self, transport: asyncio.Transport, max_size: int, write_high_water: int) -> None:
        self.transport = transport
        self._reader = FrameReader(max_size)
        self._inbox: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._close_sent = False
        self._lost = False
        self._lost_waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # set while the transport is over its high-water mark
        self.close_code: int | None = None  # the code of the client's close frame, or of our protocol error
        transport.set_write_buffer_limits(high=write_high_water)

    # --- asyncio.Protocol ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            kind = message.type
            if kind in (OP_CLOSE, MSG_ERROR):
                assert isinstance(message.data, int)
                self.close_code = message.data
                if not self._close_sent:
                    # Answer a close with its own code (RFC 6455 §5.5.1), a broken rule with its code.
                    code = message.data if close_code_allowed(message.data) else CLOSE_NORMAL
                    self._send_close(code, message.extra.encode() if kind == MSG_ERROR else b"")
                self.transport.close()  # the server closes TCP first (§7.1.1)
            self._inbox.append(message)
        if self._waiter is not None and self._inbox:
            self._wake()
        if len(self._inbox) >= INBOX_LIMIT and not self._read_paused and not self._lost:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._inbox.append(_CLOSED)
        self._wake()
        for waiter in (self._lost_waiter, self._writable):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # --- what the session uses ------------------------------------------------------

    async def receive(self) -> Message:
        """The next message; CLOSED once the connection is gone."""
        while not self._inbox:
            if self._lost:
                return _CLOSED
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._inbox.popleft()
        if self._read_paused and len(self._inbox) < INBOX_LIMIT // 2 and not self._lost:
            self._read_paused = False
            self.transport.resume_reading()
        return message

    async def send_str(self, text: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(text_frame(text.encode()))

    async def close(self, *, code: int = CLOSE_NORMAL, message: bytes = b"") -> bool:
        """Send a close frame and wait (bounded) for the client's; the socket is closed either way."""
        if self._lost:
            return False
        if not self._close_sent:
            self._send_close(code, message)
        if self._lost_waiter is None:
            self._lost_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost_waiter), CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            self.transport.abort()  # a peer that does not answer keeps no socket and no buffer here
        return True

    async def wait_writable(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) for the transport to resume writing; False if there was nothing to wait for."""
        writable = self._writable
        if writable is None or self._lost:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(writable), timeout)
        except TimeoutError:
            return False
        return True

    def finish(self) -> None:
        """The session is over: close the socket if the close handshake did not."""
        if not self.transport.is_closing():
            self.transport.close()

    # --- internals --------------------------------------------------------------------

    def _send_close(self, code: int, reason: bytes) -> None:
        self._close_sent = True
        if not self.transport.is_closing():
            self.transport.write(close_frame(code, reason))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
