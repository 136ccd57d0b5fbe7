"""The benchmark's publisher: R events per second for D seconds, on a fixed schedule.

Runs as its own process (``python -m loadtest.publisher``) so that the load
generator's reading never delays publishing. Event *i* is published at
``start_at + i / rate``. To a delta-push cluster it is ``PUBLISH
events:<channel> <envelope>`` on Redis, exactly what the SDK does; to Nchan it
is an HTTP POST of the same envelope to the publisher location (keep-alive).

The envelope's payload starts with ``"tsUs"``: the publish instant in Unix
microseconds (the envelope's ``timestamp`` is the same instant in whole
milliseconds, too coarse for sub-millisecond latencies). Prints one JSON line:
``{"published": N, "late_ms_max": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any, Coroutine

import orjson
import uvloop

from cluster.envelope import parse_envelope

MAX_IN_FLIGHT = 32


def envelope(event_type: str, seq: int, pad: int) -> bytes:
    ts_us = time.time_ns() // 1000
    doc: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": event_type,
        "source": "market-data-collector",
        "timestamp": ts_us // 1000,
        "version": "1.0",
        "payload": {
            "tsUs": ts_us,
            "seq": seq,
            "symbol": "BENCH/USDT",
            "price": "64123.5",
            "qty": "0.25",
            "pad": "x" * pad,
        },
    }
    return orjson.dumps(doc)


async def publish(args: argparse.Namespace) -> dict[str, Any]:
    parse_envelope(envelope(args.type, 0, args.pad))  # what we send is what a node accepts
    if args.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(args.redis_url, max_connections=MAX_IN_FLIGHT)
        bus_channel = f"events:{args.channel}"

        async def send(body: bytes) -> None:
            await client.publish(bus_channel, body)

        async def close() -> None:
            await client.aclose()
    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT))

        async def send(body: bytes) -> None:
            async with session.post(args.url, data=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                if response.status >= 300:
                    raise RuntimeError(f"publish refused: HTTP {response.status}")

        async def close() -> None:
            await session.close()

    total = int(args.rate * args.duration)
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)
    failures: list[str] = []
    tasks: set[asyncio.Task[None]] = set()
    late_max = 0.0

    async def one(body: bytes) -> None:
        try:
            await send(body)
        except Exception as exc:  # reported in the summary line, not swallowed
            failures.append(repr(exc)[:200])
        finally:
            gate.release()

    loop = asyncio.get_running_loop()
    start = loop.time() + max(0.0, args.start_at - time.time())
    try:
        for seq in range(total):
            due = start + seq / args.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late_max = max(late_max, -delay)
            await gate.acquire()
            task = loop.create_task(one(envelope(args.type, seq, args.pad)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
    finally:
        await close()
    return {"published": total - len(failures), "failures": failures[:5], "late_ms_max": round(late_max * 1000, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--redis-url", help="publish to a delta-push cluster through this Redis")
    target.add_argument("--url", help="publish to Nchan: its publisher location URL")
    parser.add_argument("--channel", default="market.trades:BENCH", help="delta-push channel")
    parser.add_argument("--type", default="market.trades")
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--start-at", type=float, default=0.0, help="Unix time of the first event")
    parser.add_argument("--pad", type=int, default=64, help="payload padding bytes")
    return run_and_report(publish(parser.parse_args()))


def run_and_report(publishing: Coroutine[Any, Any, dict[str, Any]]) -> int:
    """Run a publisher on uvloop, print its report as the last JSON line (the bench reads it); 1 on failures."""
    report = uvloop.run(publishing)
    print(orjson.dumps(report).decode(), flush=True)
    return 0 if not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
