"""The one WebSocket frame codec (RFC 6455 §5): the node's server side, and the client side
the load generator and the tests use.

Pure: no I/O, no asyncio, so it is fuzzed with hypothesis and tested in microseconds
(tests/test_wsframes.py). The node's socket layer (:mod:`node.websocket`) feeds
:class:`FrameReader` what it reads and writes the frames built here;
``loadtest/wsclient.py`` and ``tests/rawws.py`` build masked client frames with
:func:`client_frame` and read the server's with :func:`frame_header`.

A server's rules for what clients send, and the close code each broken rule gets:

- every client frame is masked (§5.1), reserved bits are zero and the opcode is
  known (§5.2): else 1002;
- control frames are final and carry at most 125 bytes (§5.5); a close frame's
  code is one a peer may send and its reason is UTF-8 (§7.4): else 1002 / 1007;
- fragments continue a started message and a new message waits for the last
  fragment (§5.4): else 1002;
- a message larger than ``max_size`` is refused as soon as a frame header says
  so, before its payload is buffered (1009), so a client can pin at most
  ``max_size`` plus one frame header of the node's memory;
- a text message is UTF-8 (§8.1): else 1007.

After a close frame or a broken rule the reader returns nothing more. Message
type values are those of ``aiohttp.WSMsgType``, so the node's session reads
messages from this reader and from aiohttp's alike.
"""

from __future__ import annotations

import os
from typing import NamedTuple

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
MSG_CLOSED = 257  # the connection is gone (aiohttp.WSMsgType.CLOSED)
MSG_ERROR = 258  # the client broke the protocol; ``data`` is the close code (aiohttp.WSMsgType.ERROR)

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # a close frame without a code (never sent on the wire)
CLOSE_INVALID_TEXT = 1007
CLOSE_TOO_BIG = 1009

_KNOWN_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
_MAX_CONTROL_PAYLOAD = 125


class Message(NamedTuple):
    """One complete message or control frame: ``(type, data, extra)`` as aiohttp's ``WSMessage``.

    TEXT/BINARY/PING/PONG: ``data`` is the payload. CLOSE: ``data`` is the code and
    ``extra`` the reason. ERROR: ``data`` is the close code to answer with, ``extra`` why.
    """

    type: int
    data: bytes | int
    extra: str


def close_code_allowed(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 §7.4)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` (§5.3), a word at a time."""
    length = len(payload)
    if not length:
        return b""
    key = int.from_bytes(mask * (length // 4 + 1), "little") & ((1 << (8 * length)) - 1)
    return (int.from_bytes(payload, "little") ^ key).to_bytes(length, "little")


def frame_header(buffer: bytes, pos: int = 0) -> tuple[int, int, int, int] | None:
    """(first byte, second byte, payload length, header size without the mask) of the frame at
    ``pos``, or None while the header is incomplete. The one place frame lengths are read."""
    end = len(buffer)
    if end - pos < 2:
        return None
    first, second = buffer[pos], buffer[pos + 1]
    length = second & 0x7F
    if length < 126:
        return first, second, length, 2
    if length == 126:
        if end - pos < 4:
            return None
        return first, second, int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
    if end - pos < 10:
        return None
    return first, second, int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10


class FrameReader:
    """Turns the bytes a client sends into messages, enforcing a server's rules."""

    __slots__ = ("max_size", "_buffer", "_fragments", "_fragment_opcode", "_fragment_size", "done")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = b""  # bytes of an incomplete frame (empty between frames: idle readers hold nothing)
        self._fragments: list[bytes] | None = None  # payloads of a message still being fragmented
        self._fragment_opcode = 0
        self._fragment_size = 0
        self.done = False  # a close frame or a protocol error ended the stream

    def feed(self, data: bytes) -> list[Message]:
        """Every message completed by ``data``; an ERROR message ends the stream."""
        if self.done:
            return []
        buffer = self._buffer + data if self._buffer else data
        messages: list[Message] = []
        pos = 0
        end = len(buffer)
        while (parsed := frame_header(buffer, pos)) is not None:
            first, second, length, header = parsed
            opcode = first & 0x0F
            failure = self._check_header(first, second, opcode, length)
            if failure is not None:
                messages.append(failure)
                self._stop()
                return messages
            frame_end = pos + header + 4 + length
            if frame_end > end:
                break
            mask = buffer[pos + header : pos + header + 4]
            payload = unmask(mask, buffer[pos + header + 4 : frame_end])
            pos = frame_end
            message = self._frame(first & 0x80, opcode, payload)
            if message is not None:
                messages.append(message)
                if message.type in (OP_CLOSE, MSG_ERROR):
                    self._stop()
                    return messages
        self._buffer = bytes(buffer[pos:]) if pos < end else b""
        return messages

    def _stop(self) -> None:
        self.done = True
        self._buffer = b""
        self._fragments = None

    def _check_header(self, first: int, second: int, opcode: int, length: int) -> Message | None:
        """A failure for a frame header that breaks a rule, before its payload is read."""
        if first & 0x70:
            return _error(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
        if opcode not in _KNOWN_OPCODES:
            return _error(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not second & 0x80:
            return _error(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if opcode >= OP_CLOSE:
            if not first & 0x80:
                return _error(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                return _error(CLOSE_PROTOCOL_ERROR, "control frame payload over 125 bytes")
        elif length > self.max_size or self._fragment_size + length > self.max_size:
            return _error(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")
        return None

    def _frame(self, fin: int, opcode: int, payload: bytes) -> Message | None:
        """The message a complete frame finishes, if any."""
        if opcode >= OP_CLOSE:
            if opcode == OP_CLOSE:
                return _close(payload)
            return Message(opcode, payload, "")
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                return _error(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if not fin:
                return None
            opcode, payload = self._fragment_opcode, b"".join(self._fragments)
            self._fragments, self._fragment_size = None, 0
        elif self._fragments is not None:
            return _error(CLOSE_PROTOCOL_ERROR, "a new message began before the fragmented one ended")
        elif not fin:
            self._fragments, self._fragment_opcode, self._fragment_size = [payload], opcode, len(payload)
            return None
        if opcode == OP_TEXT:
            try:
                payload.decode()
            except UnicodeDecodeError:
                return _error(CLOSE_INVALID_TEXT, "text message is not valid UTF-8")
        return Message(opcode, payload, "")


def _error(code: int, reason: str) -> Message:
    return Message(MSG_ERROR, code, reason)


def _close(payload: bytes) -> Message:
    if not payload:
        return Message(OP_CLOSE, CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        return _error(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not close_code_allowed(code):
        return _error(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        return _error(CLOSE_INVALID_TEXT, "close reason is not valid UTF-8")
    return Message(OP_CLOSE, code, reason)


# --- what the server sends (unmasked, RFC 6455 §5.1) ---------------------------------

PING_FRAME = b"\x89\x00"


def control_frame(first_byte: int, payload: bytes) -> bytes:
    """A complete, unmasked control frame (payload at most 125 bytes)."""
    return bytes((first_byte, len(payload))) + payload


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, final WebSocket text frame (RFC 6455 §5.2) for ``payload``."""
    return _length_header(0x81, 0, len(payload)) + payload


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A server close frame (unmasked, §5.5.1); the reason is cut to fit 125 bytes."""
    payload = code.to_bytes(2, "big") + reason[:123]
    return bytes((0x88, len(payload))) + payload


def _length_header(first_byte: int, mask_bit: int, length: int) -> bytes:
    if length < 126:
        return bytes((first_byte, mask_bit | length))
    if length < 65536:
        return bytes((first_byte, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((first_byte, mask_bit | 127)) + length.to_bytes(8, "big")


# --- what a client sends (masked, §5.3): the load generator and the tests ------------------


def client_frame(payload: bytes, opcode: int = OP_TEXT, mask: bytes | None = None) -> bytes:
    """A complete, final, masked client frame; ``mask`` is random unless given (tests)."""
    key = os.urandom(4) if mask is None else mask
    return _length_header(0x80 | opcode, 0x80, len(payload)) + key + unmask(key, payload)


def split_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete frames of an unmasked stream (what a server sends) as (opcode, payload), and the
    incomplete rest to keep for the next read. For clients that read frames, not messages."""
    frames: list[tuple[int, bytes]] = []
    pos, end = 0, len(buffer)
    while (header := frame_header(buffer, pos)) is not None:
        first, _, length, size = header
        start = pos + size
        if start + length > end:
            break
        frames.append((first & 0x0F, buffer[start : start + length]))
        pos = start + length
    return frames, buffer[pos:]
