"""What the router's proxy costs per relayed event, against a direct node connection.

Starts a private redis-server, one `pushctl node` and one `pushctl router`,
then runs the same fixed stream twice: N clients connected straight to the
node, then N clients connected through the router. Each phase publishes R
events per second for D seconds on one public channel every client subscribed
to, waits until every client has every event, and reads each server process's
CPU time (utime + stime from ``/proc/<pid>/stat``) before and after. The
router's CPU divided by the frames it relayed is its cost per relayed event;
the node's CPU per delivered frame in both phases shows what the node pays for
having the router as its client instead of the browsers.

    .venv/bin/python -m loadtest.router_cost [--connections 50] [--rate 400] [--duration 5] [--pad 0]

Prints one JSON object; docs/PERFORMANCE.md ("Router") records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from typing import Any

import orjson

from cluster import protocol
from loadtest.procs import Child, raise_nofile, start_node, start_redis, start_router, stop_all
from loadtest.wsclient import Stats, open_connection

CHANNEL = "market.trades:BENCH/USDT"  # public and not conflated: every event reaches every client
CLK_TCK = os.sysconf("SC_CLK_TCK")
TICKS_PER_SECOND = 100  # publishing batches per second
UNLIMITED = {"PUSH_EVENTS_PER_SECOND": "1000000", "PUSH_EVENTS_BURST": "1000000"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def envelope(seq: int, pad: int) -> bytes:
    now_ms = time.time_ns() // 1_000_000
    return orjson.dumps(
        {
            "id": str(uuid.uuid4()),
            "type": "market.trades",
            "source": "market-data-collector",
            "timestamp": now_ms,
            "version": "1.0",
            "payload": {"seq": seq, "symbol": "BENCH/USDT", "price": "64123.5", "qty": "0.25", "pad": "x" * pad},
        }
    )


async def publish(redis_url: str, rate: int, duration: float, pad: int) -> int:
    """``rate`` events per second for ``duration`` seconds, in small paced pipelines."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    total = int(rate * duration)
    per_tick = max(1, rate // TICKS_PER_SECOND)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    try:
        while sent < total:
            pipe = client.pipeline(transaction=False)
            for _ in range(min(per_tick, total - sent)):
                pipe.publish("events:" + CHANNEL, envelope(sent, pad))
                sent += 1
            await pipe.execute()
            delay = start + sent / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await client.aclose()
    return total


async def phase(port: int, pids: dict[str, int], args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    stats = Stats()
    subscribe = protocol.subscribe_request([CHANNEL], "s").encode()
    conns = [
        await open_connection("127.0.0.1", port, "/ws", stats, subscribe=subscribe) for _ in range(args.connections)
    ]
    await asyncio.wait_for(asyncio.gather(*(c.subscribed for c in conns)), 30)
    await asyncio.sleep(1.0)  # let connection set-up work finish before measuring
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    total = await publish(redis_url, args.rate, args.duration, args.pad)
    expected = total * args.connections
    deadline = time.monotonic() + 60
    while stats.delivered < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    wall = time.monotonic() - started
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for conn in conns:
        conn.close()
    cpu = {name: after[name] - before[name] for name in pids}
    delivered = stats.delivered
    return {
        "events": total,
        "frames_delivered": delivered,
        "frames_expected": expected,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": {name: round(value, 2) for name, value in cpu.items()},
        "cpu_us_per_frame": {name: round(value * 1e6 / max(1, delivered), 2) for name, value in cpu.items()},
        "lagged": stats.lagged,
        "errors": stats.errors,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    children: list[Child] = []
    try:
        redis_child, redis_url = start_redis()
        children.append(redis_child)
        node, node_port = start_node(redis_url, node_id="cost-1", **UNLIMITED)
        children.append(node)
        router, router_port = start_router(redis_url, PUSH_ROUTER_IP_RATE="1000000", PUSH_ROUTER_IP_BURST="1000000")
        children.append(router)
        direct = await phase(node_port, {"node": node.pid}, args, redis_url)
        routed = await phase(router_port, {"node": node.pid, "router": router.pid}, args, redis_url)
    finally:
        stop_all(children)
    router_us = routed["cpu_us_per_frame"]["router"]
    node_direct_us = direct["cpu_us_per_frame"]["node"]
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "connections": args.connections,
        "rate": args.rate,
        "duration": args.duration,
        "pad": args.pad,
        "direct": direct,
        "routed": routed,
        "router_cpu_us_per_relayed_event": router_us,
        "node_cpu_us_per_event_direct": node_direct_us,
        "node_cpu_us_per_event_routed": routed["cpu_us_per_frame"]["node"],
        "routed_total_vs_direct": round(
            (router_us + routed["cpu_us_per_frame"]["node"]) / max(0.01, node_direct_us), 2
        ),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50, help="clients per phase")
    parser.add_argument("--rate", type=int, default=400, help="events published per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of publishing per phase")
    parser.add_argument("--pad", type=int, default=0, help="extra payload bytes per event")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    result = uvloop.run(main(parse_args()))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    sys.exit(0 if result["routed"]["frames_delivered"] == result["routed"]["frames_expected"] else 1)
