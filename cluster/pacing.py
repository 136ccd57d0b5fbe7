"""Paced work: a drain or a reconnect wave spread over a window, never all at once (STYLE: Centrifuge).

Used by a stopping node (every client gets ``reconnect``) and a stopping router (every
relay is sent back through the load balancer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

CONCURRENCY = 100  # at most this many in flight: a burst of closes must not starve the loop


async def paced(items: Sequence[T], seconds: float, action: Callable[[T], Awaitable[object]]) -> None:
    """Start ``action`` for each item, evenly over ``seconds``, at most ``CONCURRENCY`` at a time; wait for all.

    Failures of single actions are the actions' own business: they are collected, not raised.
    """
    if not items:
        return
    pause = seconds / len(items)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def run(item: T) -> None:
        async with gate:
            await action(item)

    started = []
    for item in items:
        started.append(asyncio.create_task(run(item)))
        await asyncio.sleep(pause)
    await asyncio.gather(*started, return_exceptions=True)
