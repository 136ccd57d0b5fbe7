"""Order books for the Fossil delta tests, and the generator of tests/fixtures/fossil_delta.json.

The fixture file holds (source, target, delta) triples in base64: ``npm`` deltas made by the
reference JavaScript implementation (npm ``fossil-delta``'s ``createDelta``) and ``python``
deltas made by :func:`cluster.fossil.encode`; both ``cluster.fossil.decode`` and
``web/fossil.js`` must rebuild every target from them. Regenerate (rarely needed) with::

    mkdir -p /tmp/fossil-npm && (cd /tmp/fossil-npm && npm install fossil-delta)
    .venv/bin/python tests/fossil_fixtures.py [path/to/fossil-delta.js]
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "fossil_delta.json"
NPM_SCRIPT = HERE / "fixtures" / "fossil_npm.mjs"
NPM_MODULE = Path(os.environ.get("FOSSIL_DELTA_JS", "/tmp/fossil-npm/node_modules/fossil-delta/fossil-delta.js"))


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


def book_pair(seed: int, changes: int = 3) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    book = order_book(rng)
    return orjson.dumps(book), orjson.dumps(next_book(book, rng, changes))


def fixture_pairs() -> list[tuple[str, bytes, bytes]]:
    """Named (source, target) pairs covering the format's corners and the product's payloads."""
    rng = random.Random(15)
    pairs = [
        ("empty to empty", b"", b""),
        ("empty target", b"0123456789abcdefghij", b""),
        ("short source", b"tiny", b"tiny but longer now"),
        ("identical", b"x" * 40 + b"the same bytes" * 10, b"x" * 40 + b"the same bytes" * 10),
        ("appended", b"0123456789" * 20, b"0123456789" * 20 + b"and a tail"),
        ("prepended", b"0123456789" * 20, b"a head " + b"0123456789" * 20),
        ("utf-8 text", "ордер €64 210,50 — 🚀 ".encode() * 12, "ордер €64 211,00 — 🚀 ".encode() * 12),
        ("binary", bytes(rng.randrange(256) for _ in range(3000)), b""),
        ("unrelated", rng.randbytes(700), rng.randbytes(900)),
    ]
    blob = pairs[7][2] or bytes(rng.randrange(256) for _ in range(3000))
    changed = bytearray(blob)
    for _ in range(20):
        changed[rng.randrange(len(changed))] = rng.randrange(256)
    pairs[7] = ("binary", blob, bytes(changed[:2500]) + rng.randbytes(64) + bytes(changed[2500:]))
    for seed in range(6):
        source, target = book_pair(seed, changes=seed)
        pairs.append((f"order book, {seed} levels changed", source, target))
    return pairs


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def run_npm(mode: str, items: list[dict[str, str]], module: Path = NPM_MODULE) -> list[dict[str, str]]:
    """Run fixtures/fossil_npm.mjs (``create`` or ``apply``) over base64 items, with the npm package at ``module``."""
    result = subprocess.run(
        ["node", str(NPM_SCRIPT), mode, str(module)],
        input=json.dumps(items).encode(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    return json.loads(result.stdout)


def main() -> None:
    from cluster import fossil

    module = Path(sys.argv[1]) if len(sys.argv) > 1 else NPM_MODULE
    pairs = fixture_pairs()
    items = [{"source": _b64(source), "target": _b64(target)} for _, source, target in pairs]
    npm_deltas = run_npm("create", items, module)
    document = {
        "about": "Fossil deltas: 'npm' made by npm fossil-delta createDelta, 'python' by cluster.fossil.encode. "
        "Regenerate with tests/fossil_fixtures.py.",
        "npm": [
            {"name": name, "source": _b64(source), "target": _b64(target), "delta": made["delta"]}
            for (name, source, target), made in zip(pairs, npm_deltas, strict=True)
        ],
        "python": [
            {"name": name, "source": _b64(source), "target": _b64(target), "delta": _b64(fossil.encode(source, target))}
            for name, source, target in pairs
        ],
    }
    FIXTURES.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {len(pairs)} pairs by 2 encoders to {FIXTURES}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
