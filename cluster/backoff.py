"""Reconnect pacing shared by every loop that reconnects: the bus, membership, PushClient.

Capped exponential backoff with full jitter: the n-th wait is uniform in
``[0, min(cap, first × 2ⁿ)]``, so a whole fleet that lost Redis (or a node) at the
same moment spreads its reconnects over the window instead of arriving together.
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """How long to wait before the next attempt; ``reset()`` after a success."""

    __slots__ = ("first", "cap", "_ceiling")

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self._ceiling = min(first, cap)

    def next(self) -> float:
        """The next wait, and double the ceiling for the one after (up to ``cap``)."""
        delay = random.uniform(0, self._ceiling)
        self._ceiling = min(self._ceiling * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._ceiling = min(self.first, self.cap)

    async def wait(self) -> None:
        await asyncio.sleep(self.next())
