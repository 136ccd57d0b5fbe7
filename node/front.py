"""The first reader of every connection on a node's port: WebSocket upgrades of ``/ws`` to
the node's own WebSocket, everything else to aiohttp.

aiohttp keeps a request handler, its parser and the parsed request alive for a
WebSocket's whole life; a node holds tens of thousands of them. So the node
listens with this protocol instead of an aiohttp site: it reads the request
head, and when it is a valid ``GET /ws`` upgrade (:func:`node.wshandshake.parse_upgrade`)
hands the transport to ``on_upgrade``. Any other request — ``/healthz``,
``/metrics``, a malformed upgrade — is replayed into aiohttp's own protocol for
the app (``web.Server``), which answers it and any later request on that
connection exactly as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from node.wshandshake import MAX_HEAD_BYTES, RequestHead, head_length, parse_upgrade

UpgradeHandler = Callable[[asyncio.Transport, RequestHead, bytes, bytes], None]
"""Takes over ``(transport, request, 101 response, bytes read after the head)``."""

WS_PATH = "/ws"
_PREFIX = b"GET " + WS_PATH.encode()


class FrontProtocol(asyncio.Protocol):
    """Reads a connection's first request head, then hands the transport on for good."""

    __slots__ = ("_http", "_on_upgrade", "_transport", "_data")

    def __init__(self, http: Callable[[], asyncio.Protocol], on_upgrade: UpgradeHandler) -> None:
        self._http = http
        self._on_upgrade = on_upgrade
        self._transport: asyncio.Transport | None = None
        self._data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is not an asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        data = self._data + data if self._data else data
        self._data = data
        if not data.startswith(_PREFIX[: len(data)]):
            self._to_http()  # not an upgrade of /ws: aiohttp's, from the first byte
            return
        length = head_length(data)
        if length < 0:
            if len(data) > MAX_HEAD_BYTES:
                self._to_http()
            return
        parsed = parse_upgrade(data[:length], WS_PATH)
        if parsed is None:
            self._to_http()
            return
        assert self._transport is not None
        request, response = parsed
        transport, self._transport, self._data = self._transport, None, b""
        self._on_upgrade(transport, request, response, data[length:])

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._data = b""

    def _to_http(self) -> None:
        """aiohttp's protocol takes the transport and the bytes read so far."""
        transport, data = self._transport, self._data
        assert transport is not None
        self._transport, self._data = None, b""
        protocol = self._http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)


def front_factory(http: Callable[[], asyncio.Protocol], on_upgrade: UpgradeHandler) -> Callable[[], FrontProtocol]:
    """A protocol factory for ``loop.create_server``."""
    return lambda: FrontProtocol(http, on_upgrade)
