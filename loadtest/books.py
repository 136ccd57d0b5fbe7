"""Order books as an exchange sends them: the payload of the delta-frame bench and tests.

Shared by ``loadtest/state_bench.py`` and the fossil fixtures and tests (``tests/fossil_fixtures.py``),
so that both measure and check the same kind of stream: 50 levels a side, a few quantities
changed per update and now and then a level replaced.
"""

from __future__ import annotations

import random
from typing import Any


def _level(price: float, rng: random.Random) -> list[Any]:
    """[price, quantity, notional, orders], decimals as strings the way exchanges send them."""
    quantity = rng.uniform(0.001, 25)
    return [f"{price:.8f}", f"{quantity:.8f}", f"{price * quantity:.8f}", rng.randrange(1, 40)]


def order_book(rng: random.Random, levels: int = 50) -> dict[str, Any]:
    """A market.orderbook envelope with ``levels`` bids and asks (about 5.4 KB of JSON for 50)."""
    mid = rng.uniform(20_000, 90_000)
    bids = [_level(mid - 0.5 * (i + 1), rng) for i in range(levels)]
    asks = [_level(mid + 0.5 * (i + 1), rng) for i in range(levels)]
    return {
        "id": f"{rng.getrandbits(128):032x}",
        "type": "market.orderbook",
        "source": "market-data-collector",
        "timestamp": 1_764_780_000_000 + rng.randrange(10**6),
        "version": "1.0",
        "payload": {"symbol": "BTC/USDT", "bids": bids, "asks": asks, "sequence": rng.randrange(10**9)},
    }


def next_book(book: dict[str, Any], rng: random.Random, changes: int = 3) -> dict[str, Any]:
    """The next update of ``book``: a new id and timestamp, ``changes`` quantities changed,
    and (one time in three) a level removed and another added, shifting the rest."""
    payload = book["payload"]
    bids = [level[:] for level in payload["bids"]]
    asks = [level[:] for level in payload["asks"]]
    for _ in range(changes):
        side = rng.choice((bids, asks))
        level = rng.randrange(len(side))
        side[level] = _level(float(side[level][0]), rng)
    if rng.random() < 1 / 3:
        del bids[rng.randrange(len(bids))]
        bids.append(_level(float(bids[-1][0]) - 0.5, rng))
    return {
        **book,
        "id": f"{rng.getrandbits(128):032x}",
        "timestamp": book["timestamp"] + 100,
        "payload": {**payload, "bids": bids, "asks": asks, "sequence": payload["sequence"] + 1},
    }
