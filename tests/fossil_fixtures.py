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

import orjson

from loadtest.books import next_book, order_book

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "fossil_delta.json"
NPM_SCRIPT = HERE / "fixtures" / "fossil_npm.mjs"
NPM_MODULE = Path(os.environ.get("FOSSIL_DELTA_JS", "/tmp/fossil-npm/node_modules/fossil-delta/fossil-delta.js"))


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
