"""The WebSocket handshake rules every client-facing process applies (SPEC §4–§5).

Nodes and routers both take the token from ``?token=`` or ``Authorization:
Bearer``, check the Origin allow-list, authenticate with the same verifier, and
refuse after the upgrade (an ``error`` message, then the close code) so that
browsers can see why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from cluster import protocol
from cluster.auth import ANONYMOUS, AuthError, Identity, TokenVerifier
from cluster.metrics import CONNECTIONS_REJECTED, PROTOCOL_ERRORS
from cluster.protocol import CloseCode, ErrorCode
from cluster.settings import Settings

REJECT_CLOSE_TIMEOUT_SECONDS = 2.0


class UpgradeRequest(Protocol):
    """What admission reads from an upgrade request: ``aiohttp.web.Request`` or a node's own request head."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def query(self) -> Mapping[str, str]: ...

    @property
    def remote(self) -> str | None: ...


def origin_allowed(settings: Settings, request: UpgradeRequest) -> bool:
    """The Origin allow-list protects browsers; clients without an Origin header are not browsers."""
    origin = request.headers.get("Origin")
    return not settings.allowed_origins or origin is None or origin in settings.allowed_origins


def token_from_request(request: UpgradeRequest) -> str | None:
    """The JWT from ``?token=`` or ``Authorization: Bearer``, if any."""
    token = request.query.get("token")
    if token:
        return token
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def authenticate(verifier: TokenVerifier, token: str | None, allow_anonymous: bool) -> Identity:
    """The identity a connect request proves, or AuthError (never logs the token)."""
    if token is None:
        if allow_anonymous:
            return ANONYMOUS
        raise AuthError(ErrorCode.UNAUTHORIZED, "missing", "a token is required")
    if not verifier.configured:
        raise AuthError(ErrorCode.UNAUTHORIZED, "no_key", "this node has no key to verify tokens")
    return verifier.verify(token)


async def reject(ws: Any, code: str, message: str, close_code: int, reason: str) -> None:
    """Refuse a connection after the upgrade: an error message, then the close code.

    ``ws`` is aiohttp's ``WebSocketResponse`` or a node's own ``node.websocket.WebSocket``.
    """
    CONNECTIONS_REJECTED.labels(reason).inc()
    PROTOCOL_ERRORS.labels(code).inc()
    try:
        await ws.send_str(protocol.error(code, message))
        await asyncio.wait_for(ws.close(code=close_code, message=message.encode()[:120]), REJECT_CLOSE_TIMEOUT_SECONDS)
    except (TimeoutError, ConnectionError, RuntimeError):
        pass  # the client left first


async def send_elsewhere(ws: Any, reason: str) -> None:
    """Send a client back through the router: ``reconnect``, then close 1012 (SPEC §4). Never raises."""
    try:
        await ws.send_str(protocol.reconnect(reason))
        await asyncio.wait_for(
            ws.close(code=CloseCode.RECONNECT, message=reason.encode()[:120]), REJECT_CLOSE_TIMEOUT_SECONDS
        )
    except (TimeoutError, ConnectionError, RuntimeError):
        pass  # the client left first
