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

from node.connection import ClientConnection
from node.hub import Hub
from node.rounds import visit_every_connection


async def run_heartbeat(hub: Hub, interval: float) -> None:
    """Visit every connection once per ``interval``: ping the quiet ones, abort those quiet since their ping."""
    await visit_every_connection(hub, interval, ClientConnection.heartbeat)
