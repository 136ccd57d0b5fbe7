"""Reconnecting: the pacing every reconnecting client uses (the bus, membership, PushClient),
and the one reconnect loop of the bus and membership.

Capped exponential backoff with full jitter: the n-th wait is uniform in
``[0, min(cap, first × 2ⁿ)]``, so a whole fleet that lost Redis (or a node) at the
same moment spreads its reconnects over the window instead of arriving together.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable


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


class Reconnection:
    """What a session of :func:`keep_connected` gets: whether it follows a loss, and a way to say it is up."""

    __slots__ = ("backoff", "lost")

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.lost = False  # the last session failed: this one is a reconnect

    def connected(self) -> bool:
        """The session is up: the backoff starts over. True if this was a reconnect."""
        was_lost, self.lost = self.lost, False
        self.backoff.reset()
        return was_lost


async def keep_connected(
    session: Callable[[Reconnection], Awaitable[None]],
    errors: tuple[type[BaseException], ...],
    on_lost: Callable[[BaseException, bool], None],
    backoff: Backoff,
) -> None:
    """The one reconnect loop (the bus, membership): run ``session`` until cancelled; when it fails
    with one of ``errors``, call ``on_lost(exc, first)`` (``first``: not already lost, so say it
    once), wait the backoff and run it again. The session cleans up after itself."""
    state = Reconnection(backoff)
    while True:
        try:
            await session(state)
        except errors as exc:
            on_lost(exc, not state.lost)
            state.lost = True
            await backoff.wait()
