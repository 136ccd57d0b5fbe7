"""Kernel coalescing for the connections whose readers are behind (``PUSH_TCP_NODELAY=auto``).

Under fan-out most of a node's CPU is one ``write`` per delivery, and with TCP_NODELAY
each write also sends a segment (on loopback it runs the receiver's TCP as well). For a
reader that keeps up that is what it should get: every frame at once, evenly paced. For
a reader that is behind it is wasted work: its frames only pile up in its socket. So one
node-wide task looks at each connection's socket once per round (``TCP_INFO``, one
``getsockopt``). A reader is behind when :data:`BEHIND_BYTES` wait unsent in our socket,
or when its kernel holds frames its application has not read: its receive window
(``tcpi_snd_wnd`` less the bytes in flight: what it still accepts) is
:data:`UNREAD_BYTES` (and a quarter) below the widest it has advertised. Such a
connection gets Nagle's algorithm (:meth:`ClientConnection.coalesce`, as Nchan's
subscriber sockets always have), and TCP_NODELAY back once it has caught up for
:data:`CAUGHT_UP_ROUNDS` rounds in a row. p0 events and replies are pushed at once
either way.

No per-connection timer and no work per delivery: the cost is one ``getsockopt`` per
connection per interval (about 3 µs), spread over the interval in slices.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from node.connection import ClientConnection
from node.hub import Hub
from node.rounds import visit_every_connection

# struct tcp_info (linux/tcp.h): byte offsets of the fields read here
_BYTES_ACKED = 120  # u64 tcpi_bytes_acked (4.1+)
_NOTSENT = 144  # u32 tcpi_notsent_bytes (4.6+)
_BYTES_SENT, _BYTES_RETRANS = 200, 208  # u64 tcpi_bytes_sent, tcpi_bytes_retrans (4.19+)
_SND_WND = 228  # u32 tcpi_snd_wnd (5.4+): the client's window as last advertised, from the oldest unacked byte
_TCP_INFO_BYTES = 256
BEHIND_BYTES = 8192  # unsent bytes in our socket that mark a reader as behind (about 30 ticker events)
UNREAD_BYTES = 8192  # ... or this much (at least a quarter of its widest window) waits unread at the client
CAUGHT_UP_UNREAD_BYTES = 2048  # caught up: at most this much unread, nothing unsent
CAUGHT_UP_ROUNDS = 3  # rounds caught up in a row before frames go out one segment each again


def socket_backlog(transport: Any) -> tuple[int, int | None] | None:
    """(bytes unsent in our socket, what the client's receive window still takes, or None if the
    kernel does not say) for this transport's TCP socket; None if unknown (closed, not TCP)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, ValueError):
        return None
    if len(info) < _NOTSENT + 4:
        return None
    unsent = struct.unpack_from("I", info, _NOTSENT)[0]
    if len(info) < _SND_WND + 4:
        return unsent, None
    in_flight = (
        struct.unpack_from("Q", info, _BYTES_SENT)[0]
        - struct.unpack_from("Q", info, _BYTES_RETRANS)[0]
        - struct.unpack_from("Q", info, _BYTES_ACKED)[0]
    )
    return unsent, max(0, struct.unpack_from("I", info, _SND_WND)[0] - max(0, in_flight))


def watch(conn: ClientConnection) -> None:
    """One round for one connection: coalesce if its reader is behind, stop once it caught up."""
    if conn.closing:
        return
    backlog = socket_backlog(conn.transport)
    if backlog is None:
        return
    unsent, window = backlog
    unread = 0  # bytes the client's kernel holds that its application has not read (about)
    if window is not None:
        widest = conn.widest_window = max(conn.widest_window, window)
        unread = widest - window
    if not conn.nagle:
        if unsent >= BEHIND_BYTES or unread >= max(UNREAD_BYTES, conn.widest_window // 4):
            conn.coalesce()
    elif unsent or unread > CAUGHT_UP_UNREAD_BYTES:
        conn.caught_up_rounds = 0
    else:
        conn.caught_up_rounds += 1
        if conn.caught_up_rounds >= CAUGHT_UP_ROUNDS:
            conn.send_at_once()


async def run_backlog_watch(hub: Hub, interval: float = 1.0) -> None:
    """Look at every connection once per ``interval`` (in slices), switching Nagle by its backlog."""
    await visit_every_connection(hub, interval, watch)
