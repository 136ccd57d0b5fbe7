"""Kernel coalescing for the connections whose readers are behind (``PUSH_TCP_NODELAY=auto``).

Under fan-out most of a node's CPU is one ``write`` per delivery, and with TCP_NODELAY
each write also sends a segment (on loopback it runs the receiver's TCP as well). For a
reader that keeps up that is what it should get: every frame at once, evenly paced. For
a reader that is behind it is wasted work: its frames queue in the kernel anyway. So one
node-wide task looks at each connection's socket once per round (``SIOCOUTQNSD``: bytes
queued but not yet sent, one ``ioctl``): a connection with :data:`BEHIND_BYTES` unsent
gets Nagle's algorithm (:meth:`ClientConnection.coalesce`, as Nchan's subscriber sockets
have), and one that has had nothing unsent for :data:`CAUGHT_UP_ROUNDS` rounds in a row
gets TCP_NODELAY back. p0 events and replies are pushed at once either way.

No per-connection timer and no work per delivery: the cost is one ``ioctl`` per
connection per interval (about 3 µs), spread over the interval in slices.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import struct
from typing import Any

from node.connection import ClientConnection
from node.hub import Hub

SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in the send queue not yet sent
BEHIND_BYTES = 8192  # unsent bytes that mark a reader as behind (about 30 ticker events)
CAUGHT_UP_ROUNDS = 3  # rounds with nothing unsent before frames go out one segment each again
SLICES = 10  # 1/SLICES of the connections is looked at every interval/SLICES seconds
_ZERO = bytes(4)


def unsent_bytes(transport: Any) -> int | None:
    """Bytes the kernel holds for this transport's socket and has not sent; None if unknown."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, _ZERO))[0])
    except (OSError, ValueError):
        return None  # closed, or not a TCP socket


def watch(conn: ClientConnection) -> None:
    """One round for one connection: coalesce if its reader is behind, stop once it caught up."""
    if conn.closing:
        return
    unsent = unsent_bytes(conn.transport)
    if unsent is None:
        return
    if not conn.nagle:
        if unsent >= BEHIND_BYTES:
            conn.coalesce()
    elif unsent:
        conn.caught_up_rounds = 0
    else:
        conn.caught_up_rounds += 1
        if conn.caught_up_rounds >= CAUGHT_UP_ROUNDS:
            conn.send_at_once()


async def run_backlog_watch(hub: Hub, interval: float = 1.0) -> None:
    """Visit every connection once per ``interval`` (in slices), switching Nagle by its backlog."""
    pause = interval / SLICES
    while True:
        connections = list(hub.connections.values())
        share = max(math.ceil(len(connections) / SLICES), 1)
        for start in range(0, SLICES * share, share):
            await asyncio.sleep(pause)
            for conn in connections[start : start + share]:
                watch(conn)
