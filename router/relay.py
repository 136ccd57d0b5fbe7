"""One proxied WebSocket: client frames go to the node, node frames go to the client.

Frames are relayed as they are (payload bytes in, one frame out, nothing
decoded); close codes and reasons pass through both ways, and a node that
vanishes without a close frame becomes ``reconnect`` + 1012 for the client.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web

from cluster.handshake import send_elsewhere
from cluster.metrics import ROUTER_PROXY_ERRORS
from cluster.protocol import CloseCode

DATA_FRAMES = (WSMsgType.TEXT, WSMsgType.BINARY)


def sendable_close_code(code: int | None) -> bool:
    """Whether ``code`` may be put in a close frame (RFC 6455 §7.4)."""
    return code is not None and (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)


class Relay:
    """One proxied connection: client frames go to the node, node frames go to the client."""

    def __init__(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, node_id: str) -> None:
        self.client = client
        self.upstream = upstream
        self.node_id = node_id
        self.finished = False  # one side ended; the other is being closed
        self.reason = ""
        self.code: int | None = None

    async def run(self) -> None:
        downstream = asyncio.get_running_loop().create_task(self._node_to_client())
        try:
            await self._client_to_node()
            if not self.upstream.closed:  # the client side ended first (or the router is stopping)
                await self.upstream.close(code=1001, message=b"client went away")
            await downstream
        finally:
            if not downstream.done():
                downstream.cancel()
            if not self.upstream.closed:
                await self.upstream.close(code=1001, message=b"client went away")

    async def _client_to_node(self) -> None:
        client, upstream = self.client, self.upstream
        while True:
            msg = await client.receive()
            kind = msg.type
            if kind in DATA_FRAMES:
                try:
                    await upstream.send_frame(msg.data, kind)
                except (ConnectionError, RuntimeError):
                    continue  # the node is going away; _node_to_client sees how and tells the client
                continue
            if self.finished:
                return
            self.finished = True
            if kind is WSMsgType.CLOSE:
                code = msg.data if sendable_close_code(msg.data) else 1000
                self.reason, self.code = "client closed", msg.data
                await self.upstream.close(code=code, message=(msg.extra or "").encode()[:120])
            else:
                self.reason, self.code = "client lost", client.close_code
                await self.upstream.close(code=1001, message=b"client went away")
            return

    async def _node_to_client(self) -> None:
        client, upstream = self.client, self.upstream
        while True:
            msg = await upstream.receive()
            kind = msg.type
            if kind in DATA_FRAMES:
                try:
                    await client.send_frame(msg.data, kind)
                except (ConnectionError, RuntimeError):
                    pass  # the client is gone; _client_to_node sees it and closes the node side
                continue
            if self.finished:
                return
            self.finished = True
            if kind is WSMsgType.CLOSE and sendable_close_code(msg.data):
                self.reason, self.code = "node closed", msg.data
                await _close(client, msg.data, msg.extra or "")
            else:
                ROUTER_PROXY_ERRORS.labels("upstream_lost").inc()
                self.reason, self.code = "node lost", CloseCode.RECONNECT
                await send_elsewhere(client, "push node lost")
            return

    async def reconnect(self, reason: str) -> None:
        """Send the client back through the router (this router is stopping)."""
        if self.finished:
            return
        self.finished = True
        self.reason, self.code = reason, CloseCode.RECONNECT
        await send_elsewhere(self.client, reason)


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    try:
        await ws.close(code=code, message=reason.encode()[:120])
    except (ConnectionError, RuntimeError):
        pass  # the client left first
