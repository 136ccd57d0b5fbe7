"""Node-wide rounds over every connection, from one task instead of a timer per connection.

The heartbeat (node/heartbeat.py) and the backlog watch (node/backlog.py) each visit every
connection once per interval, spread over it in slices so that no round does all its work
at once.
"""

from __future__ import annotations

import asyncio
import math
from typing import Callable

from node.connection import ClientConnection
from node.hub import Hub

SLICES = 10  # 1/SLICES of the connections is visited every interval/SLICES seconds


async def visit_every_connection(hub: Hub, interval: float, visit: Callable[[ClientConnection], None]) -> None:
    """Call ``visit`` on each of the hub's connections once per ``interval``, in slices, forever."""
    pause = interval / SLICES
    while True:
        connections = list(hub.connections.values())
        share = max(math.ceil(len(connections) / SLICES), 1)
        for start in range(0, SLICES * share, share):
            await asyncio.sleep(pause)
            for conn in connections[start : start + share]:
                visit(conn)
