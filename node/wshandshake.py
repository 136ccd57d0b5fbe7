"""The opening handshake of a WebSocket (RFC 6455 §4.2), read from a request head: pure.

The node's front protocol (:mod:`node.front`) gives the first bytes of a
connection to :func:`parse_upgrade`. A well-formed ``GET /ws`` upgrade becomes a
:class:`RequestHead` (method, path, query, headers: what admission reads, then
drops) and the ``101`` response; anything else — another path, a plain GET, a
malformed or incomplete upgrade — is left to aiohttp, which answers it as it
always did (400 for a bad upgrade, 404, 405, /healthz, /metrics…).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from urllib.parse import parse_qsl

from multidict import CIMultiDict, MultiDict

MAX_HEAD_BYTES = 16 * 1024  # longer heads go to aiohttp, which refuses them
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
HEAD_END = b"\r\n\r\n"


class RequestHead:
    """What admission needs from an upgrade request (the attributes of ``aiohttp.web.Request`` it reads)."""

    __slots__ = ("method", "path", "query", "headers", "remote")

    def __init__(self, method: str, path: str, query: MultiDict[str], headers: CIMultiDict[str]) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.remote: str | None = None


def head_length(data: bytes) -> int:
    """Length of the request head in ``data`` (through the blank line), or -1 while incomplete."""
    end = data.find(HEAD_END)
    return -1 if end < 0 else end + len(HEAD_END)


def parse_upgrade(head: bytes, path: str) -> tuple[RequestHead, bytes] | None:
    """The request and the ``101`` response if ``head`` is a valid WebSocket upgrade of ``path``; else None."""
    if not head.startswith(b"GET " + path.encode()):
        return None
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    request_line, *lines = text.rstrip("\r\n").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1":
        return None
    target = parts[1]
    target_path, _, query = target.partition("?")
    if target_path != path:
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers.add(name, value.strip())
    if "websocket" not in headers.get("Upgrade", "").lower():
        return None
    if "upgrade" not in [token.strip() for token in headers.get("Connection", "").lower().split(",")]:
        return None
    if headers.get("Sec-WebSocket-Version") != "13":
        return None
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    request = RequestHead("GET", target_path, MultiDict(parse_qsl(query, keep_blank_values=True)), headers)
    return request, switching_protocols(key)


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (§4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def switching_protocols(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_value(key)}\r\n"
        "\r\n"
    ).encode()
