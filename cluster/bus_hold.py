"""Bus messages held while a node gets ready after a (re)connect, then handed over in order.

A node that comes back to the bus resubscribes first and then catches its clients up
from history (``on_ready``). Live messages start arriving as soon as Redis confirms the
subscriptions; delivered at once, a live event published after the outage would reach a
client before an older one the catch-up is still reading from history. So until the
node is ready, messages wait here in arrival order and are handed over after the
catch-up (which skips what it replayed by id). Bounded: past :data:`HOLD_LIMIT`
messages nothing more waits, they go straight through (out of order, never lost).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

from cluster.bus_reader import MessageHandler

HOLD_LIMIT = 100_000  # messages held while getting ready (~26 MB of 260-byte events)
RELEASE_BATCH = 1_000  # messages handed over per event-loop turn when releasing


class HoldUntilReady:
    """A message handler that holds messages until :meth:`release`, then passes them through."""

    def __init__(
        self, handler: MessageHandler, on_error: Callable[[BaseException], None], limit: int = HOLD_LIMIT
    ) -> None:
        self._handler = handler
        self._on_error = on_error
        self._limit = limit
        self._held: deque[tuple[bytes, bytes]] | None = deque()

    @property
    def holding(self) -> int:
        return len(self._held) if self._held is not None else 0

    def __call__(self, channel: bytes, data: bytes) -> None:
        held = self._held
        if held is not None and len(held) < self._limit:
            held.append((channel, data))
            return
        self._handler(channel, data)

    async def release(self) -> None:
        """Hand the held messages over in order (a batch per loop turn), then stop holding.
        Messages arriving meanwhile queue behind them, so none overtakes another."""
        held = self._held
        while held:
            for _ in range(min(len(held), RELEASE_BATCH)):
                channel, data = held.popleft()
                try:
                    self._handler(channel, data)
                except Exception as exc:  # one bad message must not stop the others
                    self._on_error(exc)
            if held:
                await asyncio.sleep(0)
        self._held = None
