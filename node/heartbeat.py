"""WebSocket protocol heartbeat for every connection of a node, from one task.

aiohttp's own heartbeat keeps two timers per connection and reschedules one on
every frame received; here one task walks the node's connections in slices over
each interval instead. A connection that sent something since the previous round
is left alone; one that stayed quiet for a whole interval gets a ping (RFC 6455
§5.5.2); one that stays quiet after its ping as well is dead and is aborted (the
client sees 1006, as with aiohttp's). Pings are paced across the interval, never
all at once.
"""

from __future__ import annotations

import asyncio
import math

from node.hub import Hub

SLICES = 10  # a node pings 1/SLICES of its connections every interval/SLICES seconds


async def run_heartbeat(hub: Hub, interval: float) -> None:
    """Visit every connection once per ``interval``: ping the quiet ones, abort those quiet since their ping."""
    pause = interval / SLICES
    while True:
        connections = list(hub.connections.values())
        share = math.ceil(len(connections) / SLICES) if connections else 0
        for start in range(0, SLICES * max(share, 1), max(share, 1)):
            await asyncio.sleep(pause)
            for conn in connections[start : start + share]:
                conn.heartbeat()
