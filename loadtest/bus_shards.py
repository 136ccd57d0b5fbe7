"""Bus throughput: one Redis Cluster shard vs three, same workload, in one run (issue 12).

    python -m loadtest.bus_shards [--seconds 10] [--users 400] [--rate N] [--json out.json]

What it measures, and why: issue 12 moves the bus to Redis Cluster so that bus
capacity grows with the number of shards, because one Redis is one core. For a
Redis Cluster of 1 master and then of 3 masters (no replicas), it starts two
push nodes on the cluster, connects ``--users`` WebSocket clients (one per user,
alternately on the two nodes, each subscribed to ``order.*``) from one reader
process, and runs one publisher process that sends private events for those
users, round-robin, as fast as it can (or at ``--rate`` events/s) for
``--seconds``: each event is the routed message ``<channel> <envelope>``
SPUBLISHed on ``push:user:{<userId>}`` (docs/BUS.md), in pipelines of
``--batch`` commands on one plain redis client per master, grouped by the
master that owns the user channel's slot. It reports, per configuration:

- events/s published, events/s delivered to the clients, and the delivered share;
- the CPU seconds of each redis-server master (``/proc/<pid>/stat`` utime+stime)
  from the start of publishing until delivery has drained, and that shard's CPU
  µs per event it carried and per event of the whole cluster;
- the push nodes' CPU µs per delivered event;

and then the ratio 3-shard / 1-shard of the busiest shard's CPU per cluster
event: the share of one Redis core that each published event costs on the shard
that saturates first. ``1 / that`` is the projected bus ceiling (events/s) of
the configuration, whatever else (nodes, publisher) limits this machine.

The 1-shard cluster is a real Redis Cluster of one master owning all 16384 slots
(made with ``CLUSTER ADDSLOTSRANGE``: ``redis-cli --cluster create`` refuses
fewer than 3 masters); the 3-shard one splits the slots evenly, as
``redis-cli --cluster create`` does. Replicas are left out: on a small machine
they would only take CPU from the processes being measured.

Everything runs on 127.0.0.1, is bounded in time, and every child is stopped by
PID (and dies with this process, ``PR_SET_PDEATHSIG``). The machine is shared:
the nodes, the reader, the publisher and Redis compete for the same cores, so
the events/s are this machine's, while the per-event CPU costs carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from redis.crc import key_slot

from cluster.auth import issue_token
from cluster.bus_routing import routed_message, user_channel
from cluster.envelope import parse_envelope
from loadtest import procs

SLOTS = 16384
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
DRAIN_TIMEOUT = 5.0
DRAIN_QUIET = 0.5
NODE_SETTINGS = {"PUSH_EVENTS_PER_SECOND": "1000000", "PUSH_EVENTS_BURST": "1000000", "PUSH_LOG_LEVEL": "warning"}
SUBSCRIBE = orjson.dumps({"action": "subscribe", "channels": ["order.*"], "id": "s"})
CONNECT_CONCURRENCY = 50
BUFFER_LIMIT_LOG = "overcoming of output buffer limits"
EVENT_TYPE = "order.filled"


def user_ids(count: int) -> list[str]:
    return [f"bs-{i}" for i in range(count)]


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Even split of the slots over ``masters``, as ``redis-cli --cluster create`` does."""
    return [(i * SLOTS // masters, (i + 1) * SLOTS // masters - 1) for i in range(masters)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the publisher process ------------------------------------------------------------------


class EventFactory:
    """Routed messages for one run: valid envelopes, unique ids, cheap to make (no JSON encoder)."""

    def __init__(self) -> None:
        self.run = os.urandom(4).hex()
        self.timestamp = time.time_ns() // 1_000_000

    def message(self, user: str, seq: int) -> bytes:
        envelope = (
            f'{{"id":"{self.run}-0000-4000-8000-{seq:012x}","type":"{EVENT_TYPE}","source":"order-executor",'
            f'"timestamp":{self.timestamp},"version":"1.0","userId":"{user}",'
            f'"payload":{{"orderId":"o-{seq}","price":"64123.5","qty":"0.25","side":"buy"}}}}'
        ).encode()
        return routed_message(f"{EVENT_TYPE}:o-{seq}", envelope)


def owners(users: list[str], ranges: dict[int, tuple[int, int]]) -> dict[int, list[str]]:
    """Users grouped by the port of the master owning their user channel's slot."""
    grouped: dict[int, list[str]] = {port: [] for port in ranges}
    for user in users:
        slot = key_slot(user_channel(user).encode())
        port = next(p for p, (lo, hi) in ranges.items() if lo <= slot <= hi)
        grouped[port].append(user)
    return grouped


def cluster_ranges(port: int) -> dict[int, tuple[int, int]]:
    """master port -> (first slot, last slot), read from CLUSTER SLOTS (one range per master here)."""
    client = redis.Redis(port=port)
    try:
        return {int(master[1]): (int(lo), int(hi)) for lo, hi, master, *_ in client.execute_command("CLUSTER", "SLOTS")}
    finally:
        client.close()


def publisher_main(args: argparse.Namespace) -> int:
    """Print ``{"ready"}``, wait for a line on stdin, publish for ``--seconds``, print the totals."""
    users = user_ids(args.users)
    grouped = {port: group for port, group in owners(users, cluster_ranges(args.seed_port)).items() if group}
    clients = {port: redis.Redis(port=port) for port in grouped}
    factory = EventFactory()
    parse_envelope(factory.message(users[0], 0).partition(b" ")[2])  # what we send is what a node accepts
    for client in clients.values():
        client.ping()
    print(orjson.dumps({"ready": True}).decode(), flush=True)
    sys.stdin.readline()
    published = dict.fromkeys(grouped, 0)
    received = 0  # SPUBLISH replies: how many node subscriptions each message reached
    cursor = dict.fromkeys(grouped, 0)
    batch = args.batch if not args.rate else max(1, min(args.batch, int(args.rate) // 50))
    seq = 0
    started = time.monotonic()
    deadline = started + args.seconds
    while time.monotonic() < deadline:
        for port, group in grouped.items():
            pipe = clients[port].pipeline(transaction=False)
            at = cursor[port]
            for _ in range(batch):
                user = group[at % len(group)]
                at += 1
                seq += 1
                pipe.execute_command("SPUBLISH", user_channel(user), factory.message(user, seq))
            cursor[port] = at
            received += sum(pipe.execute())
            published[port] += batch
        if args.rate:
            ahead = sum(published.values()) / args.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    seconds = time.monotonic() - started
    for client in clients.values():
        client.close()
    report = {"published": sum(published.values()), "per_master": published, "received": received, "seconds": seconds}
    print(orjson.dumps(report, option=orjson.OPT_NON_STR_KEYS).decode(), flush=True)
    return 0


# --- the reader process -------------------------------------------------------------------


async def reader_run(args: argparse.Namespace) -> None:
    from loadtest.wsclient import Stats, open_connection

    stats = Stats()
    ports = [int(p) for p in args.ports.split(",")]
    users = user_ids(args.users)
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(i: int, user: str) -> Any:
        async with limit:
            path = f"/ws?token={issue_token(args.secret, user, ttl_seconds=3600)}"
            conn = await open_connection("127.0.0.1", ports[i % len(ports)], path, stats, subscribe=SUBSCRIBE)
            await asyncio.wait_for(conn.subscribed, START_TIMEOUT)
            return conn

    conns = await asyncio.gather(*(connect(i, user) for i, user in enumerate(users)))
    print(orjson.dumps({"ready": True, "connections": len(conns)}).decode(), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        closed = {str(code): n for code, n in stats.closed.items()}
        report = {"delivered": stats.delivered, "lagged": stats.lagged, "errors": stats.errors, "closed": closed}
        print(orjson.dumps(report).decode(), flush=True)
    for conn in conns:
        conn.close()


def reader_main(args: argparse.Namespace) -> int:
    import uvloop

    uvloop.run(reader_run(args))
    return 0


# --- the orchestrator ---------------------------------------------------------------------


class Piped:
    """A child we talk to in JSON lines (stdin/stdout); dies with us, stopped by PID."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=procs.ROOT,
            env=procs.push_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=procs.child_setup(None, signal.SIGKILL),
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str = "") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        if not line:
            raise RuntimeError(f"{self.proc.args[3]} exited with {self.proc.wait()}")
        doc: dict[str, Any] = orjson.loads(line)
        return doc

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) exists."""
    while True:
        port = procs.free_port()
        if port + 10000 <= 65535:
            return port


def start_cluster(masters: int, workdir: Path, children: list[procs.Child]) -> dict[int, procs.Child]:
    """``masters`` redis-server masters sharing the 16384 slots evenly; port -> child."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    ports: list[int] = []
    while len(ports) < masters:
        port = cluster_port()
        if port not in ports:
            ports.append(port)
    servers: dict[int, procs.Child] = {}
    for port in ports:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf", "--dir", str(workdir)]
        argv += ["--cluster-announce-ip", "127.0.0.1", "--maxclients", "10000"]
        servers[port] = procs.Child(f"redis-cluster-{port}", argv)
        children.append(servers[port])
    for port, child in servers.items():
        procs.wait_for(functools.partial(procs.port_open, port), START_TIMEOUT, "redis-server", child)
    clients = {port: redis.Redis(port=port) for port in ports}
    try:
        for (port, client), (lo, hi) in zip(clients.items(), slot_ranges(masters), strict=True):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            if port != ports[0]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])

        def healthy() -> bool:
            for client in clients.values():
                info = client.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{masters}\r" not in info:
                    return False
                if len(client.execute_command("CLUSTER", "SLOTS")) != masters:
                    return False
            return True

        procs.wait_for(healthy, START_TIMEOUT, f"a Redis Cluster of {masters} masters")
    finally:
        for client in clients.values():
            client.close()
    return servers


def wait_subscribed(servers: dict[int, procs.Child], users: list[str]) -> None:
    """Until every user channel has one subscriber (its node's SSUBSCRIBE), on the master owning it."""
    ranges = cluster_ranges(next(iter(servers)))
    grouped = owners(users, ranges)

    def subscribed() -> bool:
        for port, group in grouped.items():
            if not group:
                continue
            client = redis.Redis(port=port)
            try:
                reply = client.execute_command("PUBSUB", "SHARDNUMSUB", *(user_channel(u) for u in group))
            finally:
                client.close()
            if sum(int(n) for n in reply[1::2]) < len(group):
                return False
        return True

    procs.wait_for(subscribed, START_TIMEOUT, "every user channel to be SSUBSCRIBEd")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


NODE_METRICS = ("events_delivered_total", 'bus_messages_total{route="user"}', "redis_reconnects_total")


@dataclass
class Shard:
    port: int
    events: int  # events published on this shard
    cpu_seconds: float
    us_per_event: float | None  # CPU per event this shard carried
    us_per_cluster_event: float | None  # CPU per event published on the whole cluster
    buffer_limit_drops: int  # subscriber connections this master closed for its pub/sub output buffer limit


@dataclass
class Result:
    shards: int
    users: int
    seconds: float
    published: int
    published_per_second: float
    reached_nodes: int  # sum of SPUBLISH replies
    delivered: int  # after draining
    delivered_in_window: int
    delivered_per_second: float
    delivered_share: float
    lagged: int
    node_delivered: int  # the nodes' events_delivered_total over the run
    node_bus_user_messages: int  # the nodes' bus_messages_total{route="user"} over the run
    node_bus_reconnects: int  # Redis dropped a node's bus (pub/sub output buffer limit) and it reconnected
    busiest_shard_us_per_event: float | None
    projected_ceiling_per_second: float | None
    node_cpu_seconds: float
    node_us_per_delivered: float | None
    publisher_cpu_seconds: float
    reader_cpu_seconds: float
    cpu_window_seconds: float
    per_shard: list[Shard] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    closed_connections: dict[str, int] = field(default_factory=dict)  # close code -> client connections


def measure(masters: int, args: argparse.Namespace) -> Result:
    """One configuration: cluster, 2 nodes, reader, publisher; everything stopped on return."""
    children: list[procs.Child] = []
    piped: list[Piped] = []
    workdir = Path(tempfile.mkdtemp(prefix="delta-push-bus-shards-"))
    try:
        servers = start_cluster(masters, workdir, children)
        seed = next(iter(servers))
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in servers)
        nodes: list[tuple[procs.Child, int]] = []
        for i in range(2):
            node, port = procs.start_node(url, node_id=f"shards{masters}-{i + 1}", **NODE_SETTINGS)
            children.append(node)
            nodes.append((node, port))
        node_ports = [port for _, port in nodes]
        python = sys.executable
        module = [python, "-m", "loadtest.bus_shards"]
        reader = Piped([*module, "reader", "--users", str(args.users), "--ports", ",".join(map(str, node_ports)),
                        "--secret", procs.BENCH_JWT_SECRET])  # fmt: skip
        piped.append(reader)
        reader.receive(START_TIMEOUT + args.users / 20)
        wait_subscribed(servers, user_ids(args.users))
        publisher_argv = [*module, "publisher", "--seed-port", str(seed), "--users", str(args.users)]
        publisher_argv += ["--seconds", str(args.seconds), "--batch", str(args.batch)]
        if args.rate:
            publisher_argv += ["--rate", str(args.rate)]
        publisher = Piped(publisher_argv)
        piped.append(publisher)
        publisher.receive(START_TIMEOUT)

        def sample() -> dict[str, float]:
            cpu = {f"redis-{port}": cpu_seconds(child.pid) for port, child in servers.items()}
            cpu.update({f"node-{port}": cpu_seconds(child.pid) for child, port in nodes})
            cpu["publisher"] = cpu_seconds(publisher.pid)
            cpu["reader"] = cpu_seconds(reader.pid)
            return cpu

        metrics0 = {name: sum(metric(p, name) for p in node_ports) for name in NODE_METRICS}
        reader.send()
        base = reader.receive(5)["delivered"]
        cpu0, t0 = sample(), time.monotonic()
        publisher.send()
        sent = publisher.receive(args.seconds + 30)
        reader.send()
        window = reader.receive(5)
        last, quiet_since, drain_deadline = window, time.monotonic(), time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < drain_deadline and last["delivered"] - base < sent["published"]:
            time.sleep(0.1)
            reader.send()
            now = reader.receive(5)
            if now["delivered"] != last["delivered"]:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > DRAIN_QUIET:
                break
            last = now
        cpu1, t1 = sample(), time.monotonic()
        metrics1 = {name: sum(metric(p, name) for p in node_ports) for name in NODE_METRICS}
        used = {name: cpu1[name] - cpu0[name] for name in cpu0}
        published = int(sent["published"])
        delivered = int(last["delivered"]) - base
        shards = []
        for port in servers:
            events = int(sent["per_master"].get(str(port), 0))
            seconds = used[f"redis-{port}"]
            drops = servers[port].log_tail(1_000_000).count(BUFFER_LIMIT_LOG)
            shards.append(Shard(port, events, round(seconds, 3), per(seconds, events), per(seconds, published), drops))
        busiest = max((s.us_per_cluster_event for s in shards if s.us_per_cluster_event), default=None)
        node_cpu = sum(used[f"node-{port}"] for port in node_ports)
        return Result(
            shards=masters,
            users=args.users,
            seconds=round(sent["seconds"], 3),
            published=published,
            published_per_second=round(published / sent["seconds"]),
            reached_nodes=int(sent["received"]),
            delivered=delivered,
            delivered_in_window=int(window["delivered"]) - base,
            delivered_per_second=round((int(window["delivered"]) - base) / sent["seconds"]),
            delivered_share=round(delivered / published, 4) if published else 0.0,
            lagged=int(last["lagged"]),
            node_delivered=int(metrics1["events_delivered_total"] - metrics0["events_delivered_total"]),
            node_bus_user_messages=int(
                metrics1['bus_messages_total{route="user"}'] - metrics0['bus_messages_total{route="user"}']
            ),
            node_bus_reconnects=int(metrics1["redis_reconnects_total"] - metrics0["redis_reconnects_total"]),
            busiest_shard_us_per_event=busiest,
            projected_ceiling_per_second=round(1e6 / busiest) if busiest else None,
            node_cpu_seconds=round(node_cpu, 3),
            node_us_per_delivered=per(node_cpu, delivered),
            publisher_cpu_seconds=round(used["publisher"], 3),
            reader_cpu_seconds=round(used["reader"], 3),
            cpu_window_seconds=round(t1 - t0, 3),
            per_shard=shards,
            errors=dict(last["errors"]),
            closed_connections=dict(last["closed"]),
        )
    finally:
        for child in reversed(piped):
            with contextlib.suppress(Exception):
                child.stop()
        procs.stop_all(children)
        shutil.rmtree(workdir, ignore_errors=True)


def per(seconds: float, events: int) -> float | None:
    """CPU µs per event, 2 decimals; None without events."""
    return round(seconds * 1e6 / events, 2) if events else None


def table(results: list[Result]) -> str:
    rows = [
        "| shards | published/s | delivered/s | delivered share | Redis CPU s per master | "
        "Redis µs/event per master (own events) | busiest shard µs per cluster event | projected ceiling ev/s | "
        "node µs/delivered |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in results:
        cpu = " / ".join(f"{s.cpu_seconds:.2f}" for s in r.per_shard)
        own = " / ".join(f"{s.us_per_event}" for s in r.per_shard)
        rows.append(
            f"| {r.shards} | {r.published_per_second:,} | {r.delivered_per_second:,} | {r.delivered_share:.1%} | "
            f"{cpu} | {own} | {r.busiest_shard_us_per_event} | "
            f"{r.projected_ceiling_per_second or 0:,} | {r.node_us_per_delivered} |"
        )
    return "\n".join(rows)


def ratio(results: list[Result]) -> float | None:
    by = {r.shards: r.busiest_shard_us_per_event for r in results}
    one, three = by.get(1), by.get(3)
    return round(three / one, 3) if one and three else None


def main_run(args: argparse.Namespace) -> int:
    procs.raise_nofile()
    started = time.monotonic()
    load = os.getloadavg()
    results = [measure(masters, args) for masters in args.shards]
    shard_ratio = ratio(results)
    mode = f"at {args.rate:g} events/s" if args.rate else "as fast as the publisher can"
    print(f"\nBus throughput, {args.users} users on 2 nodes, private events {mode} for {args.seconds:g} s")
    print(
        f"machine: {os.cpu_count()} cores shared by Redis, both nodes, the publisher and the reader, and other "
        f"processes running meanwhile (load average {load[0]:.2f} at start): events/s are this machine's; "
        "the CPU per event is what carries over.\n"
    )
    print(table(results))
    print(f"\nbusiest shard's CPU per event, 3 shards / 1 shard: {shard_ratio}")
    for r in results:
        print(
            f"{r.shards} shard(s): published {r.published}, reached a node {r.reached_nodes}, delivered {r.delivered} "
            f"({r.node_delivered} by the nodes' metrics, {r.node_bus_user_messages} user-channel bus messages), "
            f"lagged {r.lagged}, bus reconnects {r.node_bus_reconnects}, subscribers dropped by Redis for their "
            f"output buffer {sum(s.buffer_limit_drops for s in r.per_shard)}, client connections closed "
            f"{r.closed_connections or 0}; CPU s over {r.cpu_window_seconds} s: nodes {r.node_cpu_seconds}, "
            f"publisher {r.publisher_cpu_seconds}, reader {r.reader_cpu_seconds}; events per shard "
            f"{[s.events for s in r.per_shard]}"
        )
    print(f"run took {time.monotonic() - started:.1f} s")
    if args.json:
        doc = {
            "users": args.users,
            "seconds": args.seconds,
            "rate": args.rate,
            "cores": os.cpu_count(),
            "load_average_at_start": load,
            "configurations": [asdict(r) for r in results],
            "busiest_shard_ratio_3_over_1": shard_ratio,
        }
        Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bus_shards", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing time per configuration")
    parser.add_argument("--users", type=int, default=400, help="users, one WebSocket connection each")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s to publish (0: as fast as possible)")
    parser.add_argument("--batch", type=int, default=100, help="SPUBLISH commands per pipeline")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 3], help="masters of each configuration")
    parser.add_argument("--json", default="", help="also write the results here")
    sub = parser.add_subparsers(dest="role")
    reader = sub.add_parser("reader", help="(internal) the WebSocket clients")
    reader.add_argument("--users", type=int, required=True)
    reader.add_argument("--ports", required=True)
    reader.add_argument("--secret", required=True)
    publisher = sub.add_parser("publisher", help="(internal) the SPUBLISH load")
    publisher.add_argument("--seed-port", type=int, required=True)
    publisher.add_argument("--users", type=int, required=True)
    publisher.add_argument("--seconds", type=float, required=True)
    publisher.add_argument("--batch", type=int, default=100)
    publisher.add_argument("--rate", type=float, default=0.0)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.role == "reader":
        return reader_main(args)
    if args.role == "publisher":
        return publisher_main(args)
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
