"""The bus-ingest benchmark's publisher: N events through the public SDK, as fast as it can.

    python -m loadtest.sdk_publisher --redis-url URL --type order.filled --user 'off-{n}' --spread 10000 \\
        --events 100000 --tasks 16

Runs as its own process (on the load generator's CPU) so that the generator's
reading never slows publishing. It uses only ``cluster.events.EventPublisher``
and its ``publish(type, payload, key=..., user_id=...)`` — the SDK's public API —
so the same workload measures whatever bus the SDK and the node implement. One
SDK call is a round trip to Redis, so ``--tasks`` calls are kept in flight on one
publisher. Event *i* (``--offset`` + the i-th of this process) is for user
``--user`` and/or on key ``--key`` with ``{n}`` replaced by i mod ``--spread``.
Publishing stops after ``--events`` or ``--max-seconds``, whichever comes first.

Start-up is out of the measured window: it connects and loads the SDK's script
(one warm-up event for a user nobody is connected as), prints ``{"ready": true}``,
then waits for one line on stdin — the Unix time to start at. At the end it prints
one JSON line: ``{"published", "failures", "started", "seconds"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson

from cluster.events import DEFAULT_SOURCE_BY_DOMAIN, EventPublisher
from loadtest.publisher import run_and_report

WARMUP_USER = "bench-warmup"


def event_args(args: argparse.Namespace, seq: int) -> dict[str, Any]:
    """Keyword arguments of ``publish`` for event ``seq``."""
    n = seq % args.spread
    kwargs: dict[str, Any] = {}
    if args.user:
        kwargs["user_id"] = args.user.replace("{n}", str(n))
    if args.key:
        kwargs["key"] = args.key.replace("{n}", str(n))
    return kwargs


async def publish(args: argparse.Namespace) -> dict[str, Any]:
    source = DEFAULT_SOURCE_BY_DOMAIN.get(args.type.partition(".")[0], "order-executor")
    publisher = EventPublisher(args.redis_url, source=source)
    failures: list[str] = []
    published = 0
    next_seq = 0
    started = seconds = 0.0
    try:
        await publisher.publish("order.filled", {"warmup": True}, user_id=WARMUP_USER)  # connect, load the script
        print(orjson.dumps({"ready": True}).decode(), flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        delay = float(line or 0) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.time()
        deadline = time.monotonic() + args.max_seconds

        async def worker() -> None:
            nonlocal published, next_seq
            while next_seq < args.events and time.monotonic() < deadline:
                seq = args.offset + next_seq
                next_seq += 1
                payload = {"seq": seq, "orderId": f"o-{seq}", "price": "64123.5", "qty": "0.25", "side": "buy"}
                try:
                    await publisher.publish(args.type, payload, **event_args(args, seq))
                    published += 1
                except Exception as exc:  # reported in the summary line, not swallowed
                    failures.append(repr(exc)[:200])
                    if len(failures) > 100:
                        return

        await asyncio.gather(*(worker() for _ in range(args.tasks)))
        seconds = time.time() - started
    finally:
        await publisher.close()
    return {"published": published, "failures": failures[:5], "started": started, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--type", default="order.filled")
    parser.add_argument("--user", default="", help="user id template, {n} = event number mod --spread")
    parser.add_argument("--key", default="", help="channel key template, {n} = event number mod --spread")
    parser.add_argument("--spread", type=int, default=1)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--offset", type=int, default=0, help="number of this process's first event")
    parser.add_argument("--tasks", type=int, default=16, help="SDK calls in flight")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    return run_and_report(publish(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
