"""Order-book stream, full events vs delta frames, in one run (issue 15).

    .venv/bin/python -m loadtest.state_bench [--connections 200] [--rate 10] [--seconds 15] [--json out.json]

What it measures, and why: issue 15 sends a state channel's events as Fossil deltas of the
previous envelope when a subscription asks (``options.delta: "fossil"``, docs/DELTA.md), to
save the bandwidth an order book stream wastes re-sending the same levels. One node on a
private redis-server; for each mode (``full`` then ``delta``) ``--connections`` WebSocket
clients subscribe to one ``market.orderbook`` channel (its own per mode) and the SDK
publishes ``--rate`` updates per second for ``--seconds`` of a 50-level book (about 5.5 KB
of JSON; each update changes 3 levels, and one time in three removes a level and adds
another). It reports, per mode:

- bytes received on the wire per connection per second (every byte the client sockets
  read during the window, WebSocket headers included);
- the node's CPU per delivery (``/proc/<pid>/stat`` utime+stime over the window ÷ event
  frames received), which for ``delta`` includes the one ``fossil.encode`` per update;
- for ``delta``, the share of event frames that were deltas;

and checks that one client per mode, rebuilding envelopes as the clients do, ends with the
last published book byte for byte. Every child is stopped by PID and dies with this
process; the whole run takes about 45 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from cluster import fossil
from cluster.events import EventPublisher
from cluster.wsframes import split_frames
from loadtest import procs
from loadtest.books import next_book, order_book
from loadtest.wsclient import BenchWebSocket, Stats

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
NODE_SETTINGS = {"PUSH_EVENTS_PER_SECOND": "1000", "PUSH_EVENTS_BURST": "1000", "PUSH_LOG_LEVEL": "warning"}
DRAIN_TIMEOUT = 5.0
DELTA_MARK = b'"delta":true'
EVENT_PREFIX = b'{"action":"event"'


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the book stream ---------------------------------------------------------------------


def books(count: int, seed: int = 15, levels: int = 50) -> list[dict[str, Any]]:
    """``count`` successive order book payloads (loadtest/books.py)."""
    rng = random.Random(seed)
    book = order_book(rng, levels)
    out = []
    for _ in range(count):
        out.append(book["payload"])
        book = next_book(book, rng)
    return out


# --- readers ---------------------------------------------------------------------------


class ByteCounter(BenchWebSocket):
    """A bench connection that also counts the bytes its socket reads and the delta frames."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes = 0
        self.deltas = 0
        self.pending = b""  # the frame parser's own tail, only to find "delta":true in each event

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.upgraded:
            self._count_deltas(data)
        super().data_received(data)

    def _count_deltas(self, data: bytes) -> None:
        frames, self.pending = split_frames(self.pending + data if self.pending else data)
        for _, payload in frames:
            if payload.startswith(EVENT_PREFIX) and payload.find(DELTA_MARK, 0, 200) >= 0:
                self.deltas += 1


class Checker(BenchWebSocket):
    """One connection per mode that rebuilds every envelope as the clients do (the last must match)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last: bytes | None = None
        self.base: tuple[int, bytes] | None = None
        self.failures = 0
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        data = self.pending + data if self.pending else data
        self.pending = b""
        if not self.upgraded:
            data = self._upgrade(data)
            if not self.upgraded:
                self.pending, self._buf = self._buf, b""
                return
        frames, self.pending = split_frames(data)
        for opcode, payload in frames:
            if opcode != 1:
                continue
            if payload.startswith(EVENT_PREFIX):
                self._event(payload)
            else:
                self._message(payload)  # welcome (then it subscribes), ack

    def _event(self, frame: bytes) -> None:
        doc = orjson.loads(frame)
        data = doc["data"]
        if not isinstance(data, str):  # a full subscriber: the envelope is spliced in as is
            start = frame.index(b',"data":') + len(b',"data":')
            self.last = frame[start : frame.rindex(b',"cursor":')]
            return
        try:
            if doc.get("delta"):
                if self.base is None or self.base[0] != doc["seq"] - 1:
                    raise fossil.FossilError("no base")
                raw = fossil.decode(self.base[1], data.encode())
            else:
                raw = data.encode()
        except fossil.FossilError:
            self.failures += 1
            self.base = None
            return
        self.base = (doc["seq"], raw)
        self.last = raw


@dataclass
class ModeResult:
    mode: str
    connections: int
    published: int
    seconds: float
    delivered: int
    expected: int
    bytes_per_connection_per_second: float
    node_cpu_us_per_delivery: float
    delta_share: float
    last_book_matches: bool
    errors: dict[str, int]


async def run_mode(mode: str, args: argparse.Namespace, node_pid: int, port: int, redis_url: str) -> ModeResult:
    channel = f"market.orderbook:BENCH-{mode.upper()}"
    options: dict[str, Any] = {"delta": "fossil"} if mode == "delta" else {}
    subscribe = orjson.dumps({"action": "subscribe", "channels": [channel], "options": options, "id": "s"})
    stats = Stats()
    loop = asyncio.get_running_loop()
    readers: list[ByteCounter] = []
    for _ in range(args.connections):
        _, reader = await loop.create_connection(
            lambda: ByteCounter(HOST, port, "/ws", stats, subscribe=subscribe), HOST, port
        )
        readers.append(reader)
    _, checker = await loop.create_connection(
        lambda: Checker(HOST, port, "/ws", Stats(), subscribe=subscribe), HOST, port
    )
    await asyncio.wait_for(asyncio.gather(*(r.subscribed for r in [*readers, checker])), 20)
    publisher = EventPublisher(redis_url, source="market-data-collector")
    updates = books(int(args.rate * args.seconds), seed=args.seed)
    key = channel.partition(":")[2]
    try:
        await publisher.publish("market.orderbook", updates[0], key=key)  # warm-up: the chain's first, full event
        await asyncio.sleep(0.5)
        for reader in readers:
            reader.bytes = reader.deltas = reader.delivered = 0
        stats.delivered = 0
        cpu_before, started = cpu_seconds(node_pid), time.monotonic()
        last: dict[str, Any] = {}
        for i, payload in enumerate(updates[1:], start=1):
            delay = started + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            last = await publisher.publish("market.orderbook", payload, key=key)
        published = len(updates) - 1
        expected = published * args.connections
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while stats.delivered < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(node_pid) - cpu_before
    finally:
        await publisher.close()
    delivered = stats.delivered
    received = sum(r.bytes for r in readers)
    deltas = sum(r.deltas for r in readers)
    await asyncio.sleep(0.2)
    matches = checker.last is not None and orjson.loads(checker.last) == last and checker.failures == 0
    for reader in [*readers, checker]:
        reader.close()
    return ModeResult(
        mode=mode,
        connections=args.connections,
        published=published,
        seconds=round(seconds, 2),
        delivered=delivered,
        expected=expected,
        bytes_per_connection_per_second=round(received / args.connections / (published / args.rate)),
        node_cpu_us_per_delivery=round(cpu / max(1, delivered) * 1e6, 1),
        delta_share=round(deltas / max(1, delivered), 3),
        last_book_matches=matches,
        errors=stats.errors,
    )


async def bench(args: argparse.Namespace) -> list[ModeResult]:
    procs.raise_nofile()
    children: list[procs.Child] = []
    try:
        redis_child, redis_url = procs.start_redis()
        children.append(redis_child)
        node, port = procs.start_node(redis_url, node_id="state-bench", **NODE_SETTINGS)
        children.append(node)
        return [await run_mode(mode, args, node.pid, port, redis_url) for mode in ("full", "delta")]
    finally:
        procs.stop_all(children)


def report(results: list[ModeResult]) -> str:
    lines = [
        f"{'mode':<6} {'bytes/conn/s':>12} {'node CPU µs/delivery':>21} {'delivered':>16} {'delta share':>11} {'last book ok':>12}"
    ]
    for r in results:
        lines.append(
            f"{r.mode:<6} {r.bytes_per_connection_per_second:>12,} {r.node_cpu_us_per_delivery:>21} "
            f"{f'{r.delivered}/{r.expected}':>16} {r.delta_share:>11} {r.last_book_matches!s:>12}"
        )
    full, delta = results
    lines.append(
        f"delta/full: bytes {delta.bytes_per_connection_per_second / max(1, full.bytes_per_connection_per_second):.3f}, "
        f"node CPU per delivery {delta.node_cpu_us_per_delivery / max(0.001, full.node_cpu_us_per_delivery):.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="book updates per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    results = asyncio.run(bench(args))
    print(report(results))
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(orjson.dumps([asdict(r) for r in results], option=orjson.OPT_INDENT_2).decode())
    ok = all(r.last_book_matches and r.delivered >= r.expected * 0.99 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
