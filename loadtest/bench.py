"""The fan-out benchmark: one push node against Nchan, same workloads, same run.

    .venv/bin/python -m loadtest.bench            # full run, about 1.5 minutes (3 at most with reruns)
    .venv/bin/python -m loadtest.bench --quick    # smoke run, about 40 seconds

It starts a private redis-server and one ``pushctl node`` (pinned to CPU 0),
and an nginx with the Nchan module (one worker, pinned to CPU 0), while this
process — the load generator — and the publisher run on CPU 1. For each server:

- idle: RSS growth of the server process over N idle subscribed connections;
- W1 / W2: C connections on one channel, R events/s published for D seconds
  (to Redis with ``PUBLISH events:<channel>``, as the SDK does; to Nchan by HTTP
  POST): delivered/s, delivered/expected, latency p50/p99/max (publish instant
  → receipt), and server CPU µs per delivered event = (utime+stime from
  /proc/<pid>/stat over the steady window) ÷ (deliveries in that window);
- storm: 5,000 simultaneous connects (delta-push: each with its own JWT) until
  every one is welcomed (Nchan: upgraded).

Absolute numbers drift on a shared machine; the ratios to Nchan measured in the
same run are what the targets are about. The node is started with a push rate
limit far above the workloads (``PUSH_EVENTS_PER_SECOND`` / ``PUSH_EVENTS_BURST``
10,000) so that the per-connection limit of 100 events/s is not what is
measured. See docs/PERFORMANCE.md for the method and the numbers.

``--workloads w2slow`` (issue 13) is W2 with readers that cannot keep up
(``--slow-reader aiohttp|sleep``, loadtest/slowreaders.py), both servers, its own table.

``--workloads ingest,bus-storm`` selects the bus-ingest family instead (issue 11;
its own Redis and node, no Nchan): node CPU µs per SDK-published event that no
connection wants (and per event with one recipient), measured against the node's
idle rate just before, and a storm of keyed subscribes with Redis's client count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import uvloop

from loadtest import procs, slowreaders
from loadtest.wsclient import BenchWebSocket, Stats, Subscriber, open_connection

HOST = "127.0.0.1"
SERVER_CPU = 0
CLIENT_CPU = 1
MAX_LATENCY_SAMPLES_PER_SECOND = 25_000  # probe connections are chosen to stay under this
SETUP_CONCURRENCY = 200
SETUP_TIMEOUT = 60.0
STORM_TIMEOUT = 30.0
GRACE_SECONDS = 5.0
SAMPLE_SECONDS = 1.0
MIN_CLEAN_SAMPLES = 3  # fewer undisturbed seconds than this: CPU per delivery over the whole window
INTERFERENCE = 0.25  # share of the server's core used by anything else before a row is flagged as disturbed
NCHAN_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "w1_cpu_ratio": 1.3,
    "w1_p99_ms": 20.0,
    "w2_delivery": 0.99,
    "w2_cpu_ratio": 1.3,
    "idle_kb": 20.0,
    "storm_seconds": 3.0,
    "w2slow_cpu_ratio": 1.3,  # issue 13, with readers slower than the servers write
}
SLOW_READ_SHARE = 0.8  # the sleep reader reads this share of the offered rate


# --- /proc accounting ---------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy_seconds(cpu: int) -> float:
    """Time CPU ``cpu`` was busy (everything but idle and iowait), from /proc/stat, in seconds."""
    with open("/proc/stat", "rb") as handle:
        for line in handle:
            if line.startswith(f"cpu{cpu} ".encode()):
                values = [int(v) for v in line.split()[1:]]
                return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK
    return 0.0


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as handle:
        for line in handle:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


# --- the servers under test ----------------------------------------------------------------


class Server:
    """A push server under test: where to connect, how to publish, which pid to measure."""

    name = ""
    nchan = False
    port = 0
    pid = 0

    def sub_path(self, key: str, index: int) -> str:
        raise NotImplementedError

    def storm_path(self, index: int) -> str:
        raise NotImplementedError

    def subscribe_message(self, key: str) -> bytes | None:
        return None

    def publisher_args(self, key: str) -> list[str]:
        raise NotImplementedError

    async def connections(self) -> int | None:
        """Open connections the server reports, if it can tell."""
        return None

    def stop(self) -> None:
        raise NotImplementedError


class PushServer(Server):
    """Redis + one `pushctl node`; every connection carries its own user's JWT."""

    name = "delta-push"

    def __init__(self, cpus: set[int] | None, client_cpus: set[int] | None, max_users: int, **settings: str) -> None:
        from cluster.auth import issue_token

        self.children: list[procs.Child] = []
        try:
            redis_child, self.redis_url = procs.start_redis(client_cpus)
            self.children.append(redis_child)
            node, self.port = procs.start_node(
                self.redis_url,
                node_id="bench",
                cpus=cpus,
                **{"PUSH_EVENTS_PER_SECOND": "10000", "PUSH_EVENTS_BURST": "10000", **settings},
            )
            self.children.append(node)
        except BaseException:
            procs.stop_all(self.children)
            raise
        self.pid = node.pid
        self._tokens = [issue_token(procs.BENCH_JWT_SECRET, f"bench-{i}", ttl_seconds=3600) for i in range(max_users)]

    @staticmethod
    def channel(key: str) -> str:
        return f"market.trades:{key}"

    def sub_path(self, key: str, index: int) -> str:
        return f"/ws?token={self._tokens[index]}"

    def storm_path(self, index: int) -> str:
        return f"/ws?token={self._tokens[index]}"

    def subscribe_message(self, key: str) -> bytes:
        return orjson.dumps({"action": "subscribe", "channels": [self.channel(key)], "id": "bench"})

    def publisher_args(self, key: str) -> list[str]:
        return ["--redis-url", self.redis_url, "--channel", self.channel(key), "--type", "market.trades"]

    async def connections(self) -> int | None:
        loop = asyncio.get_running_loop()

        def ask() -> int | None:
            import urllib.request

            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/readyz", timeout=2) as response:
                    return int(orjson.loads(response.read())["connections"])
            except (OSError, ValueError, KeyError):
                return None

        return await loop.run_in_executor(None, ask)

    def stop(self) -> None:
        procs.stop_all(self.children)


NGINX_CONF = """\
load_module {module};
worker_processes 1;
worker_cpu_affinity {affinity};
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections {connections}; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen {host}:{port} backlog=8192;
    location ~ ^/sub/(\\w+)$ {{
      nchan_subscriber websocket;
      nchan_channel_id $1;
    }}
    location ~ ^/pub/(\\w+)$ {{
      nchan_publisher http;
      nchan_channel_id $1;
      nchan_message_buffer_length 16;
      nchan_message_timeout 30s;
    }}
  }}
}}
"""


def nchan_module() -> str | None:
    for directory in NCHAN_MODULE_DIRS:
        path = Path(directory) / "ngx_nchan_module.so"
        if path.exists():
            return str(path)
    return None


def ensure_nchan(install: bool) -> str | None:
    """None if nginx + Nchan are usable, else why not (after trying apt-get if allowed)."""
    if shutil.which("nginx") and nchan_module():
        return None
    if not install:
        return "nginx or its Nchan module is not installed (apt-get install -y nginx-light libnginx-mod-nchan)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "nginx-light / libnginx-mod-nchan are missing and apt-get cannot be run here"
    print("installing the Nchan reference: apt-get install -y nginx-light libnginx-mod-nchan", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for argv in (
            ["apt-get", "install", "-y", "-qq", "nginx-light", "libnginx-mod-nchan"],
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "nginx-light", "libnginx-mod-nchan"],
        ):
            done = subprocess.run(argv, env=env, capture_output=True, timeout=240)
            if argv[1] == "install" and done.returncode == 0:
                break
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get failed: {exc}"
    if shutil.which("nginx") and nchan_module():
        return None
    return "apt-get could not install nginx-light and libnginx-mod-nchan"


class NchanServer(Server):
    """nginx with one worker and the Nchan module: WebSocket subscribers, HTTP publisher, no auth."""

    name = "nchan"
    nchan = True

    def __init__(self, cpus: set[int] | None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="delta-push-nchan-")
        self.port = procs.free_port()
        nofile = procs.raise_nofile()
        cpu = min(cpus) if cpus else 0
        conf = NGINX_CONF.format(
            module=nchan_module(),
            affinity="1" + "0" * cpu,
            nofile=nofile,
            connections=max(1024, nofile - 100),
            tmp=self.tmp,
            host=HOST,
            port=self.port,
        )
        conf_path = Path(self.tmp) / "nginx.conf"
        conf_path.write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.child = procs.Child(
            "nginx", [nginx, "-p", self.tmp, "-c", str(conf_path)], cpus=cpus, death_signal=signal.SIGTERM
        )
        try:
            procs.wait_for(lambda: procs.port_open(self.port), procs.START_TIMEOUT, "nginx", self.child)
            workers: list[int] = []

            def worker_up() -> bool:
                workers[:] = children_of(self.child.pid)
                return len(workers) == 1

            procs.wait_for(worker_up, procs.START_TIMEOUT, "the nginx worker", self.child)
        except BaseException:
            self.stop()
            raise
        self.pid = workers[0]

    def sub_path(self, key: str, index: int) -> str:
        return f"/sub/{key}"

    def storm_path(self, index: int) -> str:
        return "/sub/STORM"

    def publisher_args(self, key: str) -> list[str]:
        return ["--url", f"http://{HOST}:{self.port}/pub/{key}"]

    def stop(self) -> None:
        self.child.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- results ----------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    server: str
    connections: int = 0
    rate: float = 0.0
    published: int = 0
    expected: int = 0
    delivered: int = 0
    delivered_per_second: float | None = None
    delivery_ratio: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    cpu_us_per_delivery: float | None = None
    rss_kb_per_conn: float | None = None
    connect_seconds: float | None = None
    cpu_us_per_connect: float | None = None
    server_cpu: float | None = None
    server_core_busy: float | None = None
    generator_cpu: float | None = None
    clean_seconds: str | None = None
    clean: int = 0
    sampled: int = 0
    lagged: int = 0
    failed_connections: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""
    # the slow-reader workload (issue 13); None/empty elsewhere
    reader: str | None = None  # "aiohttp" or "sleep"
    window_share: float | None = None  # delivered in the steady window ÷ (rate * window * connections)
    loaded_kb_per_conn: float | None = None  # RSS growth over the connections at the end of the window
    lagged_notices: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)  # connections the server closed, by code


@dataclass
class Sample:
    """Counters read once per second during a steady window."""

    at: float
    delivered: int
    server: float  # server process CPU seconds
    core: float  # the server's core, busy seconds (anything running on it)
    generator: float  # this process's CPU seconds


def percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] / 1000.0


# --- phases -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.loop = asyncio.get_running_loop()

    async def open_many(
        self,
        count: int,
        stats: Stats,
        key: str,
        *,
        subscribe: bool,
        probe_every: int = 0,
        concurrency: int | None = SETUP_CONCURRENCY,
        timeout: float = SETUP_TIMEOUT,
        storm: bool = False,
        subscribe_for: Callable[[int], bytes] | None = None,
        connect: Callable[[str, bytes | None, bool], Awaitable[Subscriber]] | None = None,
    ) -> tuple[list[Subscriber], list[Subscriber], list[float]]:
        """Open ``count`` connections; returns (ready, all opened, ready times).

        ``subscribe_for(index)``, if given, is connection ``index``'s own subscribe message;
        ``connect(path, subscribe, probe)``, if given, opens one connection instead of the fast client.
        """
        server = self.server
        opened: list[Subscriber] = []
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        message = server.subscribe_message(key) if subscribe else None

        async def one(index: int) -> tuple[Subscriber, float]:
            path = server.storm_path(index) if storm else server.sub_path(key, index)
            probe = probe_every > 0 and index % probe_every == 0
            if gate is not None:
                await gate.acquire()
            try:
                own = subscribe_for(index) if subscribe_for is not None else message
                ws: Subscriber
                if connect is not None:
                    ws = await connect(path, own, probe)
                else:
                    ws = await open_connection(
                        HOST, server.port, path, stats, nchan=server.nchan, subscribe=own, probe=probe
                    )
                opened.append(ws)
                ready_at = await (ws.subscribed if subscribe else ws.welcomed)
                return ws, ready_at
            finally:
                if gate is not None:
                    gate.release()

        tasks = [self.loop.create_task(one(i)) for i in range(count)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        ready: list[Subscriber] = []
        times: list[float] = []
        for task in done:
            if task.cancelled() or task.exception() is not None:
                if not task.cancelled():
                    stats.error(type(task.exception()).__name__)
                continue
            ws, ready_at = task.result()
            ready.append(ws)
            times.append(ready_at)
        return ready, opened, times

    async def close_all(self, connections: list[Subscriber]) -> None:
        for ws in connections:
            ws.close()
        deadline = self.loop.time() + 10
        while self.loop.time() < deadline:
            await asyncio.sleep(0.2)
            remaining = await self.server.connections()
            if remaining is None:
                await asyncio.sleep(1.0)  # nothing to ask: give the server a moment to reap
                break
            if remaining == 0:
                break
        gc.collect()

    async def idle(self, count: int) -> Row:
        row = Row(f"idle {count} subscribed", self.server.name, connections=count)
        stats = Stats()
        _, warm_opened, _ = await self.open_many(min(100, count), stats, "IDLEWARM", subscribe=True)
        await self.close_all(warm_opened)
        await asyncio.sleep(1.0)
        before = rss_kb(self.server.pid)
        ready, opened, _ = await self.open_many(count, stats, "IDLE", subscribe=True)
        await asyncio.sleep(2.0)
        after = rss_kb(self.server.pid)
        row.failed_connections = count - len(ready)
        row.rss_kb_per_conn = (after - before) / max(1, len(ready))
        row.errors = stats.errors
        await self.close_all(opened)
        return row

    def slow_connect(
        self, reader: str, stats: Stats, rate: float, session: Any
    ) -> Callable[[str, bytes | None, bool], Awaitable[Subscriber]]:
        """How :meth:`open_many` opens one slow reader of kind ``reader`` (see loadtest/slowreaders.py)."""
        server = self.server
        read_rate = rate * self.args.slow_read_share

        async def connect(path: str, subscribe: bytes | None, probe: bool) -> Subscriber:
            if reader == "aiohttp":
                url = f"http://{HOST}:{server.port}{path}"
                return slowreaders.AiohttpReader(
                    session, url, stats, nchan=server.nchan, subscribe=subscribe, probe=probe
                )
            return await slowreaders.open_throttled(
                HOST,
                server.port,
                path,
                stats,
                read_rate=read_rate,
                nchan=server.nchan,
                subscribe=subscribe,
                probe=probe,
            )

        return connect

    async def fanout(
        self, label: str, count: int, rate: float, duration: float, warmup: float, reader: str | None = None
    ) -> Row:
        """One fan-out; ``reader`` ("aiohttp" or "sleep") makes every connection a reader that cannot keep up."""
        title = f"{label} {count} conns x {rate:g}/s" + (f" {reader}" if reader else "")
        row = Row(title, self.server.name, connections=count, rate=rate, reader=reader)
        stats = Stats()
        probe_every = max(1, math.ceil(count * rate / MAX_LATENCY_SAMPLES_PER_SECOND))
        session = slowreaders.new_session() if reader == "aiohttp" else None
        connect = self.slow_connect(reader, stats, rate, session) if reader else None
        rss_before = rss_kb(self.server.pid)
        ready, opened, _ = await self.open_many(
            count, stats, label, subscribe=True, probe_every=probe_every, connect=connect
        )
        row.failed_connections = count - len(ready)
        samples: list[Sample] = []
        try:
            await asyncio.sleep(1.0 if reader else 0.5)
            if reader:
                row.rss_kb_per_conn = (rss_kb(self.server.pid) - rss_before) / max(1, len(ready))
            start_at = time.time() + 1.0
            start = self.loop.time() + 1.0
            publisher = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "loadtest.publisher",
                *self.server.publisher_args(label),
                "--rate",
                str(rate),
                "--duration",
                str(duration),
                "--start-at",
                repr(start_at),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=procs.ROOT,
                preexec_fn=procs.child_setup(None, signal.SIGKILL),
            )
            await asyncio.sleep(max(0.0, start + warmup - self.loop.time()))
            samples = [self.sample(stats)]
            end = start + duration
            while self.loop.time() < end - 0.05:
                await asyncio.sleep(
                    max(0.0, min(SAMPLE_SECONDS - (self.loop.time() - samples[-1].at), end - self.loop.time()))
                )
                samples.append(self.sample(stats))
            if reader:
                row.loaded_kb_per_conn = (rss_kb(self.server.pid) - rss_before) / max(1, len(ready))
            try:
                out, err = await asyncio.wait_for(publisher.communicate(), timeout=30)
            except TimeoutError:
                publisher.kill()
                await publisher.wait()
                raise RuntimeError("the publisher did not finish") from None
            lines = out.decode().strip().splitlines()
            if not lines:
                raise RuntimeError(f"the publisher failed: {err.decode()[-500:]}")
            report = orjson.loads(lines[-1])
            row.published = int(report["published"])
            if report.get("failures"):
                row.note = f"publish failures: {report['failures'][:2]}"
            row.expected = row.published * len(ready)
            deadline = self.loop.time() + GRACE_SECONDS
            while stats.delivered < row.expected and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
        finally:
            # before the bench closes them: only what the server closed is counted
            row.close_codes = {str(code): n for code, n in stats.closed.items()}
            if session is not None:
                await slowreaders.close_session(session, opened)
            await self.close_all(opened)
        if len(samples) < 2:
            raise RuntimeError(f"{title}: no steady window was sampled")
        first, last = samples[0], samples[-1]
        window = last.at - first.at
        delivered_in_window = last.delivered - first.delivered
        row.delivered = stats.delivered
        row.delivered_per_second = delivered_in_window / window if window > 0 else None
        row.delivery_ratio = stats.delivered / row.expected if row.expected else None
        if window > 0 and ready:
            row.window_share = delivered_in_window / (rate * window * len(ready))
        if window > 0:
            row.generator_cpu = (last.generator - first.generator) / window
            row.server_cpu = (last.server - first.server) / window
            row.server_core_busy = (last.core - first.core) / window
        # CPU per delivery over the seconds in which nothing else competed for the server's core.
        clean = [
            (b.server - a.server, b.delivered - a.delivered)
            for a, b in itertools.pairwise(samples)
            if (b.core - a.core) - (b.server - a.server) <= INTERFERENCE * (b.at - a.at)
        ]
        row.clean, row.sampled = len(clean), len(samples) - 1
        row.clean_seconds = f"{row.clean}/{row.sampled}"
        cpu = sum(c for c, _ in clean) if len(clean) >= MIN_CLEAN_SAMPLES else last.server - first.server
        deliveries = sum(d for _, d in clean) if len(clean) >= MIN_CLEAN_SAMPLES else delivered_in_window
        if deliveries:
            row.cpu_us_per_delivery = cpu * 1e6 / deliveries
        ordered = sorted(stats.latencies_us)
        row.p50_ms, row.p99_ms, row.max_ms = (
            percentile(ordered, 0.5),
            percentile(ordered, 0.99),
            percentile(ordered, 1.0),
        )
        row.lagged = stats.lagged
        row.lagged_notices = stats.lagged_notices
        row.errors = stats.errors
        return row

    def sample(self, stats: Stats) -> Sample:
        return Sample(
            self.loop.time(),
            stats.delivered,
            cpu_seconds(self.server.pid),
            cpu_busy_seconds(SERVER_CPU),
            cpu_seconds(os.getpid()),
        )

    async def steady_fanout(
        self, label: str, count: int, rate: float, duration: float, warmup: float, reader: str | None = None
    ) -> Row:
        """:meth:`fanout`, run once more (at most) when other processes disturbed most of its seconds."""
        row = await self.fanout(label, count, rate, duration, warmup, reader)
        if row.sampled >= MIN_CLEAN_SAMPLES and row.clean * 2 < row.sampled:
            again = await self.fanout(label, count, rate, duration, warmup, reader)
            kept = again if again.clean > row.clean else row
            # RSS growth means something only on the first run: the second reuses the pages the first freed
            kept.rss_kb_per_conn, kept.loaded_kb_per_conn = row.rss_kb_per_conn, row.loaded_kb_per_conn
            kept.note = f"run twice: the first run had {row.clean}/{row.sampled} undisturbed seconds"
            return kept
        return row

    async def storm(self, count: int) -> Row:
        row = Row(f"storm {count} connects", self.server.name, connections=count)
        stats = Stats()
        cpu0 = cpu_seconds(self.server.pid)
        t0 = time.monotonic()
        ready, opened, times = await self.open_many(
            count, stats, "STORM", subscribe=False, concurrency=None, timeout=STORM_TIMEOUT, storm=True
        )
        elapsed = (max(times) - t0) if times else math.nan
        cpu1 = cpu_seconds(self.server.pid)
        row.failed_connections = count - len(ready)
        row.connect_seconds = elapsed if len(ready) == count else None
        if row.failed_connections:
            row.note = f"{len(ready)} of {count} welcomed within {STORM_TIMEOUT:g} s"
        row.cpu_us_per_connect = (cpu1 - cpu0) * 1e6 / max(1, len(ready))
        row.errors = stats.errors
        await self.close_all(opened)
        return row


# --- bus ingest (issue 11): what a node pays for events it does not deliver ---------------

INGEST_CASES = ("offline-private", "public-unsubscribed", "arriving-unwanted", "wanted-one")
INGEST_PUBLISH_SECONDS = 20.0  # per case: fewer events are published if the SDK is slower than that
INGEST_SETTLE_SECONDS = 0.25
INGEST_SETTLE_TIMEOUT = 10.0
INGEST_SETTINGS = {"PUSH_EVENTS_PER_SECOND": "1000000", "PUSH_EVENTS_BURST": "1000000"}
BUS_STORM_TIMEOUT = 60.0
REDIS_POLL_SECONDS = 0.02
OTHER_CHANNEL = "market.ticker:OTHER"
INGEST_USER = "u-1"
UNRELATED_USERS = 10
OFFLINE_USERS = 10_000
PUBLIC_SYMBOLS = 500


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds: user and kernel time are reported apart."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rpartition(b")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


@dataclass(frozen=True)
class IngestCase:
    """One ingest workload: who is connected, and what the SDK publishes meanwhile."""

    name: str
    connections: tuple[tuple[str, tuple[str, ...]], ...]  # (user, channels) held during the case
    publish: tuple[str, ...]  # loadtest.sdk_publisher arguments: type, user/key templates, spread
    wanted: bool = False  # every event is for the one connection, and must arrive


def ingest_case(name: str) -> IngestCase:
    unrelated = tuple((f"bench-{i}", (OTHER_CHANNEL,)) for i in range(UNRELATED_USERS))
    private = ("--type", "order.filled", "--user", INGEST_USER)
    cases = {
        "offline-private": IngestCase(
            name, unrelated, ("--type", "order.filled", "--user", "off-{n}", "--spread", str(OFFLINE_USERS))
        ),
        "public-unsubscribed": IngestCase(
            name, unrelated, ("--type", "market.ticker", "--key", "SYM{n}", "--spread", str(PUBLIC_SYMBOLS))
        ),
        "arriving-unwanted": IngestCase(name, ((INGEST_USER, (OTHER_CHANNEL,)),), private),
        "wanted-one": IngestCase(name, ((INGEST_USER, ("order.*",)),), private, wanted=True),
    }
    return cases[name]


@dataclass
class IngestRow:
    workload: str
    connections: int = 0
    published: int | None = None
    publish_rate: float | None = None  # events/s the SDK publishers reached together
    bus_received: int | None = None  # what the node took from the bus (its events_published_total)
    expected: int = 0
    delivered: int = 0
    delivery_ratio: float | None = None
    idle_cpu: float | None = None  # the node's share of a core just before publishing
    cpu_us_per_event: float | None = None  # node CPU over the window, minus idle, per event published
    user_us_per_event: float | None = None
    system_us_per_event: float | None = None
    window_seconds: float | None = None
    server_cpu: float | None = None
    server_core_busy: float | None = None
    generator_cpu: float | None = None
    connect_seconds: float | None = None  # bus-storm: first connect → last ack
    cpu_us_per_connect: float | None = None
    redis_clients_peak: int | None = None  # bus-storm: INFO clients, minus the generator's own
    redis_clients_before: int | None = None
    redis_clients_final: int | None = None
    failed_connections: int = 0
    lagged: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""


@dataclass
class CpuSample:
    at: float
    user: float  # node utime, s
    system: float  # node stime, s
    core: float  # CPU 0 busy, s
    generator: float  # this process, s

    @property
    def node(self) -> float:
        return self.user + self.system


def metric_values(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page, for the names asked."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            with contextlib.suppress(ValueError):
                found[name] = float(value)
    return found


class IngestBench(Bench):
    """The bus-ingest family, against one node through public entry points only.

    SDK publish (``loadtest.sdk_publisher``), the node's ``/ws`` and ``/metrics``, and
    ``/proc``: nothing here knows how the bus is wired, so the same code measures the
    node before and after the bus changes.
    """

    server: PushServer

    async def node_counters(self) -> dict[str, float]:
        def ask() -> dict[str, float]:
            import urllib.request

            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.server.port}/metrics", timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                return {}
            return metric_values(text, ("events_published_total", "events_delivered_total"))

        return await self.loop.run_in_executor(None, ask)

    def cpu_sample(self) -> CpuSample:
        user, system = cpu_times(self.server.pid)
        return CpuSample(self.loop.time(), user, system, cpu_busy_seconds(SERVER_CPU), cpu_seconds(os.getpid()))

    async def connect_users(self, case: IngestCase, stats: Stats) -> list[BenchWebSocket]:
        from cluster.auth import issue_token

        sockets = []
        for user, channels in case.connections:
            token = issue_token(procs.BENCH_JWT_SECRET, user, ttl_seconds=3600)
            message = orjson.dumps({"action": "subscribe", "channels": list(channels), "id": "bench"})
            ws = await open_connection(HOST, self.server.port, f"/ws?token={token}", stats, subscribe=message)
            sockets.append(ws)
            await asyncio.wait_for(ws.subscribed, SETUP_TIMEOUT)
        return sockets

    async def start_publishers(self, case: IngestCase, events: int) -> list[asyncio.subprocess.Process]:
        """The SDK publisher processes, connected and waiting for their start time."""
        count = max(1, self.args.ingest_publishers)
        started: list[asyncio.subprocess.Process] = []
        try:
            for index in range(count):
                share = events // count + (1 if index < events % count else 0)
                started.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "loadtest.sdk_publisher",
                        "--redis-url",
                        self.server.redis_url,
                        *case.publish,
                        "--events",
                        str(share),
                        "--offset",
                        str(index * (events // count + 1)),
                        "--tasks",
                        str(self.args.ingest_tasks),
                        "--max-seconds",
                        str(INGEST_PUBLISH_SECONDS),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                        cwd=procs.ROOT,
                        preexec_fn=procs.child_setup(None, signal.SIGKILL),
                    )
                )
            for proc in started:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), procs.START_TIMEOUT)
                if b'"ready"' not in line:
                    err = await proc.stderr.read() if proc.stderr is not None else b""
                    raise RuntimeError(f"an SDK publisher failed to start: {err.decode()[-500:]}")
        except BaseException:
            for proc in started:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        return started

    async def ingest(self, name: str, events: int) -> IngestRow:
        """Node CPU per SDK-published event over the publish window, minus its idle rate just before."""
        case = ingest_case(name)
        row = IngestRow(f"ingest {name}", connections=len(case.connections))
        stats = Stats()
        sockets = await self.connect_users(case, stats)
        publishers: list[asyncio.subprocess.Process] = []
        try:
            publishers = await self.start_publishers(case, events)
            before = await self.node_counters()
            await asyncio.sleep(0.3)
            idle = self.cpu_sample()
            await asyncio.sleep(self.args.ingest_idle)
            start = self.cpu_sample()
            go = f"{time.time()!r}\n".encode()
            for proc in publishers:
                assert proc.stdin is not None
                proc.stdin.write(go)
            try:
                outputs = await asyncio.wait_for(
                    asyncio.gather(*(proc.communicate() for proc in publishers)), INGEST_PUBLISH_SECONDS + 30
                )
            except TimeoutError:
                raise RuntimeError("the SDK publishers did not finish") from None
            reports = []
            for out, err in outputs:
                lines = out.decode().strip().splitlines()
                if not lines:
                    raise RuntimeError(f"an SDK publisher failed: {err.decode()[-500:]}")
                reports.append(orjson.loads(lines[-1]))
            row.published = sum(int(r["published"]) for r in reports)
            failures = [f for r in reports for f in r.get("failures", [])]
            if failures:
                row.note = f"publish failures: {failures[:2]}"
            first = min(r["started"] for r in reports)
            last = max(r["started"] + r["seconds"] for r in reports)
            row.publish_rate = row.published / (last - first) if last > first else None
            row.expected = row.published if case.wanted else 0
            # The window ends when the node is back at its idle rate (and, if wanted, everything arrived).
            idle_rate = (start.node - idle.node) / (start.at - idle.at)
            end = self.cpu_sample()
            deadline = self.loop.time() + INGEST_SETTLE_TIMEOUT
            while self.loop.time() < deadline:
                await asyncio.sleep(INGEST_SETTLE_SECONDS)
                previous, end = end, self.cpu_sample()
                quiet = end.node - previous.node <= idle_rate * (end.at - previous.at) + 1.5 / CLK_TCK
                if quiet and stats.delivered >= row.expected:
                    break
            after = await self.node_counters()
        finally:
            for proc in publishers:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            await self.close_all(sockets)
        window = end.at - start.at
        idle_seconds = start.at - idle.at
        row.window_seconds = window
        row.idle_cpu = idle_rate
        row.server_cpu = (end.node - start.node) / window
        row.server_core_busy = (end.core - start.core) / window
        row.generator_cpu = (end.generator - start.generator) / window
        if row.published:
            user = (end.user - start.user) - (start.user - idle.user) / idle_seconds * window
            system = (end.system - start.system) - (start.system - idle.system) / idle_seconds * window
            row.user_us_per_event = user * 1e6 / row.published
            row.system_us_per_event = system * 1e6 / row.published
            row.cpu_us_per_event = row.user_us_per_event + row.system_us_per_event
        if "events_published_total" in before and "events_published_total" in after:
            row.bus_received = int(after["events_published_total"] - before["events_published_total"])
        row.delivered = stats.delivered
        row.delivery_ratio = stats.delivered / row.expected if row.expected else None
        row.lagged = stats.lagged
        row.errors = stats.errors
        return row

    async def bus_storm(self, count: int) -> IngestRow:
        """``count`` connections subscribe at once, each to its own keyed channel: time, Redis connections."""
        import redis.asyncio as aioredis

        row = IngestRow(f"bus-storm {count} keyed subscribes", connections=count)
        poller = aioredis.Redis.from_url(self.server.redis_url)

        async def redis_clients() -> int:
            info = await poller.info("clients")
            return int(info["connected_clients"]) - 1  # the poller's own connection

        stats = Stats()
        stop = asyncio.Event()
        poll_errors: list[str] = []
        try:
            row.redis_clients_before = peak = await redis_clients()

            async def poll() -> None:
                nonlocal peak
                while not stop.is_set():
                    try:
                        peak = max(peak, await redis_clients())
                    except (OSError, aioredis.RedisError) as exc:
                        poll_errors.append(type(exc).__name__)
                    await asyncio.sleep(REDIS_POLL_SECONDS)

            poller_task = self.loop.create_task(poll())
            cpu0 = cpu_seconds(self.server.pid)
            t0 = time.monotonic()
            ready, opened, times = await self.open_many(
                count,
                stats,
                "BUS",
                subscribe=True,
                concurrency=None,
                timeout=BUS_STORM_TIMEOUT,
                storm=True,
                subscribe_for=lambda i: orjson.dumps(
                    {"action": "subscribe", "channels": [f"market.ticker:S{i}"], "id": "bench"}
                ),
            )
            cpu1 = cpu_seconds(self.server.pid)
            await asyncio.sleep(0.5)  # anything the node does after the last ack still counts
            stop.set()
            await poller_task
            row.redis_clients_peak = peak
            row.redis_clients_final = await redis_clients()
            row.failed_connections = count - len(ready)
            row.connect_seconds = (max(times) - t0) if times and len(ready) == count else None
            row.cpu_us_per_connect = (cpu1 - cpu0) * 1e6 / max(1, len(ready))
            if row.failed_connections:
                row.note = f"{len(ready)} of {count} acked within {BUS_STORM_TIMEOUT:g} s"
            if poll_errors:
                row.note += f" INFO clients failed {len(poll_errors)} times ({poll_errors[0]})"
            row.errors = stats.errors
            row.lagged = stats.lagged
            await self.close_all(opened)
        finally:
            stop.set()
            await poller.aclose()
        return row


INGEST_COLUMNS = [
    ("workload", "workload", 30, "s"),
    ("published", "published", 9, ",d"),
    ("pub ev/s", "publish_rate", 8, ",.0f"),
    ("node got", "bus_received", 8, ",d"),
    ("deliv/exp", "delivery_ratio", 9, ".4f"),
    ("idle CPU", "idle_cpu", 8, ".1%"),
    ("CPU µs/ev", "cpu_us_per_event", 9, ".2f"),
    ("user µs", "user_us_per_event", 7, ".2f"),
    ("sys µs", "system_us_per_event", 6, ".2f"),
    ("window s", "window_seconds", 8, ".1f"),
    ("srv CPU", "server_cpu", 7, ".0%"),
    ("CPU0 busy", "server_core_busy", 9, ".0%"),
    ("gen CPU", "generator_cpu", 7, ".0%"),
    ("connect s", "connect_seconds", 9, ".2f"),
    ("CPU µs/conn", "cpu_us_per_connect", 11, ".0f"),
    ("redis before", "redis_clients_before", 12, "d"),
    ("redis peak", "redis_clients_peak", 10, "d"),
    ("redis end", "redis_clients_final", 9, "d"),
]


async def run_ingest(args: argparse.Namespace, server: PushServer) -> list[IngestRow]:
    bench = IngestBench(args, server)
    rows: list[IngestRow] = []
    gc.disable()
    try:
        for name in INGEST_CASES:
            if f"ingest:{name}" in args.workloads:
                rows.append(await bench.ingest(name, args.ingest_events))
        if "bus-storm" in args.workloads:
            rows.append(await bench.bus_storm(args.bus_storm))
    finally:
        gc.enable()
    return rows


async def run_workloads(args: argparse.Namespace, servers: list[Server]) -> list[Row]:
    """Each workload on every server back to back, so that compared rows are measured close in time."""
    benches = [Bench(args, server) for server in servers]
    rows: list[Row] = []
    workloads = args.workloads
    gc.disable()  # no collector pauses in the load generator while it measures
    try:
        if "idle" in workloads:
            for bench in benches:  # first, while every server is fresh
                rows.append(await bench.idle(args.idle))
        for label in ("w1", "w2"):
            if label in workloads:
                count, rate = getattr(args, label)
                for bench in benches:
                    rows.append(await bench.steady_fanout(label.upper(), count, rate, args.duration, args.warmup))
        if "w2slow" in workloads:
            count, rate = args.w2slow
            for bench in benches:
                rows.append(
                    await bench.steady_fanout("W2SLOW", count, rate, args.duration, args.warmup, args.slow_reader)
                )
        if "storm" in workloads:
            for bench in benches:
                rows.append(await bench.storm(args.storm))
    finally:
        gc.enable()
    return rows


# --- output -------------------------------------------------------------------------------

COLUMNS = [
    ("workload", "workload", 26, "s"),
    ("server", "server", 10, "s"),
    ("delivered/s", "delivered_per_second", 11, ",.0f"),
    ("deliv/exp", "delivery_ratio", 9, ".4f"),
    ("p50 ms", "p50_ms", 7, ".2f"),
    ("p99 ms", "p99_ms", 7, ".2f"),
    ("max ms", "max_ms", 7, ".1f"),
    ("CPU µs/deliv", "cpu_us_per_delivery", 12, ".2f"),
    ("KB/conn", "rss_kb_per_conn", 7, ".1f"),
    ("connect s", "connect_seconds", 9, ".2f"),
    ("CPU µs/conn", "cpu_us_per_connect", 11, ".0f"),
    ("srv CPU", "server_cpu", 7, ".0%"),
    ("CPU0 busy", "server_core_busy", 9, ".0%"),
    ("clean s", "clean_seconds", 7, ">"),
    ("gen CPU", "generator_cpu", 7, ".0%"),
]


SLOW_COLUMNS = [
    ("workload", "workload", 34, "s"),
    ("server", "server", 10, "s"),
    ("delivered/s", "delivered_per_second", 11, ",.0f"),
    ("win share", "window_share", 9, ".4f"),
    ("deliv/exp", "delivery_ratio", 9, ".4f"),
    ("p50 ms", "p50_ms", 8, ".1f"),
    ("p99 ms", "p99_ms", 8, ".1f"),
    ("CPU µs/deliv", "cpu_us_per_delivery", 12, ".2f"),
    ("KB/conn", "rss_kb_per_conn", 7, ".1f"),
    ("KB loaded", "loaded_kb_per_conn", 9, ".1f"),
    ("lagged", "lagged_notices", 6, "d"),
    ("dropped", "lagged", 7, "d"),
    ("srv CPU", "server_cpu", 7, ".0%"),
    ("CPU0 busy", "server_core_busy", 9, ".0%"),
    ("clean s", "clean_seconds", 7, ">"),
    ("gen CPU", "generator_cpu", 7, ".0%"),
]


def render_table(rows: list[Row] | list[IngestRow], columns: list[tuple[str, str, int, str]] = COLUMNS) -> str:
    lines = ["  ".join(f"{title:<{width}}" if fmt == "s" else f"{title:>{width}}" for title, _, width, fmt in columns)]
    for row in rows:
        cells = []
        for _, name, width, fmt in columns:
            value = getattr(row, name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append(f"{'-':>{width}}")
            elif fmt == "s":
                cells.append(f"{value:<{width}}")
            elif fmt == ">":
                cells.append(f"{value:>{width}}")
            else:
                cells.append(f"{value:>{width}{fmt}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def compare(rows: list[Row]) -> dict[str, Any]:
    """our/Nchan ratios per workload and the issue's targets."""
    by = {(r.workload.split()[0], r.server): r for r in rows}
    ratios: dict[str, float | None] = {}
    for workload, metric in (
        ("W1", "cpu_us_per_delivery"),
        ("W2", "cpu_us_per_delivery"),
        ("W1", "p99_ms"),
        ("W2", "p99_ms"),
        ("W2SLOW", "cpu_us_per_delivery"),
        ("W2SLOW", "window_share"),
        ("W2SLOW", "delivery_ratio"),
        ("W2SLOW", "p99_ms"),
        ("W2SLOW", "rss_kb_per_conn"),
        ("idle", "rss_kb_per_conn"),
        ("storm", "connect_seconds"),
        ("storm", "cpu_us_per_connect"),
    ):
        ours, theirs = by.get((workload, "delta-push")), by.get((workload, "nchan"))
        if ours is not None and theirs is not None:
            ratios[f"{workload} {metric}"] = ratio(getattr(ours, metric), getattr(theirs, metric))
    checks: dict[str, bool | None] = {}

    def check(name: str, value: float | None, limit: float, at_least: bool = False) -> None:
        checks[name] = None if value is None else (value >= limit if at_least else value <= limit)

    w1, w2 = by.get(("W1", "delta-push")), by.get(("W2", "delta-push"))
    idle, storm = by.get(("idle", "delta-push")), by.get(("storm", "delta-push"))
    if w1 is not None:
        check("W1 CPU/delivery ≤ 1.3x Nchan", ratios.get("W1 cpu_us_per_delivery"), TARGETS["w1_cpu_ratio"])
        check("W1 p99 ≤ 20 ms", w1.p99_ms, TARGETS["w1_p99_ms"])
        check("W1 nothing lost", w1.delivery_ratio, 1.0, at_least=True)
    if w2 is not None:
        check("W2 delivered/expected ≥ 0.99", w2.delivery_ratio, TARGETS["w2_delivery"], at_least=True)
        check("W2 CPU/delivery ≤ 1.3x Nchan", ratios.get("W2 cpu_us_per_delivery"), TARGETS["w2_cpu_ratio"])
    slow, slow_nchan = by.get(("W2SLOW", "delta-push")), by.get(("W2SLOW", "nchan"))
    if slow is not None and slow_nchan is not None:
        check("W2slow CPU/delivery ≤ 1.3x Nchan", ratios.get("W2SLOW cpu_us_per_delivery"), TARGETS["w2slow_cpu_ratio"])
        for name, metric in (("in the window", "window_share"), ("after grace", "delivery_ratio")):
            ours, theirs = getattr(slow, metric), getattr(slow_nchan, metric)
            checks[f"W2slow delivered {name} ≥ Nchan's"] = None if ours is None or theirs is None else ours >= theirs
    if idle is not None:
        check("idle ≤ 20 KB/conn", idle.rss_kb_per_conn, TARGETS["idle_kb"])
    if storm is not None:
        check(f"storm {storm.connections} connects ≤ 3 s", storm.connect_seconds, TARGETS["storm_seconds"])
    return {"ratios": ratios, "targets": checks}


def render_comparison(summary: dict[str, Any]) -> str:
    lines = []
    if summary["ratios"]:
        parts = [
            f"{name} {value:.2f}x" if value is not None else f"{name} -" for name, value in summary["ratios"].items()
        ]
        lines.append("ours/nchan: " + "; ".join(parts))
    if summary["targets"]:
        marks = {True: "met", False: "MISSED", None: "n/a"}
        lines.append("targets:    " + "; ".join(f"{name}: {marks[ok]}" for name, ok in summary["targets"].items()))
    return "\n".join(lines)


def environment_line(pinned: bool, nchan: str, nice: int = 0) -> str:
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    pin = (
        f"servers on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}"
        if pinned
        else "NOT pinned (fewer than 2 CPUs)"
    )
    return (
        f"delta-push bench {time.strftime('%Y-%m-%d %H:%M:%S')} · {platform.node()} · {os.cpu_count()} CPUs · "
        f"Linux {platform.release()} · Python {platform.python_version()} · {pin} · somaxconn {somaxconn} · "
        f"reference: {nchan}" + (f" · nice {nice}" if nice else "")
    )


# --- main -------------------------------------------------------------------------------------


FANOUT_WORKLOADS = ("idle", "w1", "w2", "w2slow", "storm")


def expand_workloads(text: str) -> list[str]:
    """The comma list of ``--workloads``, with ``ingest`` standing for every ingest case."""
    known = [*FANOUT_WORKLOADS, *(f"ingest:{c}" for c in INGEST_CASES), "bus-storm"]
    chosen: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        names = [f"ingest:{c}" for c in INGEST_CASES] if word == "ingest" else [word] if word else []
        for name in names:
            if name not in known:
                raise SystemExit(f"unknown workload: {name} (known: ingest, {', '.join(known)})")
            if name not in chosen:
                chosen.append(name)
    return chosen


def parse_workload(text: str) -> tuple[int, float]:
    conns, _, rate = text.lower().partition("x")
    return int(conns), float(rate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description="Fan-out benchmark: one delta-push node against Nchan."
    )
    parser.add_argument("--w1", type=parse_workload, default=(1000, 20.0), metavar="CONNSxRATE", help="default 1000x20")
    parser.add_argument("--w2", type=parse_workload, default=(2000, 50.0), metavar="CONNSxRATE", help="default 2000x50")
    parser.add_argument(
        "--w2slow", type=parse_workload, default=(2000, 50.0), metavar="CONNSxRATE", help="default 2000x50"
    )
    parser.add_argument(
        "--slow-reader",
        choices=slowreaders.SLOW_READERS,
        default="aiohttp",
        help="w2slow's readers: aiohttp (a ws_connect + receive() loop decoding every frame, CPU-bound on the "
        "generator's core; the default) or sleep (the fast client pausing after each read, reproducible)",
    )
    parser.add_argument(
        "--slow-read-share",
        type=float,
        default=SLOW_READ_SHARE,
        help=f"the sleep reader reads this share of the offered events/s per connection (default {SLOW_READ_SHARE})",
    )
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of publishing per workload (default 12)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the steady window (default 2)")
    parser.add_argument("--idle", type=int, default=2000, help="idle subscribed connections (default 2000)")
    parser.add_argument("--storm", type=int, default=5000, help="simultaneous connects (default 5000)")
    parser.add_argument(
        "--workloads",
        default="idle,w1,w2,storm",
        help="comma list of idle,w1,w2,storm (the fan-out family, the default), w2slow (issue 13: W2 with readers "
        "that cannot keep up, see --slow-reader) and ingest (= all of "
        + ",".join(f"ingest:{c}" for c in INGEST_CASES)
        + "), bus-storm (the bus-ingest family, no Nchan)",
    )
    parser.add_argument(
        "--ingest-events", type=int, default=150_000, help="SDK events per ingest workload (default 150000)"
    )
    parser.add_argument("--ingest-publishers", type=int, default=1, help="SDK publisher processes (default 1)")
    parser.add_argument("--ingest-tasks", type=int, default=16, help="SDK calls in flight per publisher (default 16)")
    parser.add_argument(
        "--ingest-idle", type=float, default=3.0, help="seconds of node idle rate before each ingest (default 3)"
    )
    parser.add_argument("--bus-storm", type=int, default=5000, help="bus-storm connections (default 5000)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: W1 200x20, W2 and W2slow 400x50, 4 s, idle 500, storm 1000; ingest 5000 events, bus-storm 1000",
    )
    parser.add_argument(
        "--node-setting",
        type=procs.parse_node_setting,
        action="append",
        default=[],
        metavar="PUSH_NAME=VALUE",
        help="a node setting for the fan-out and idle workloads (repeatable), e.g. PUSH_TCP_NODELAY=true",
    )
    parser.add_argument("--no-nchan", action="store_true", help="skip the Nchan reference")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install nginx/Nchan if missing")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="renice the bench and every process it starts (e.g. -5 on a shared machine; needs root below 0)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="abort the measurements after this long (default 300; installing Nchan is bounded separately)",
    )
    return parser


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    pinned = procs.cpu_count() >= 2 and {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    server_cpus = {SERVER_CPU} if pinned else None
    client_cpus = {CLIENT_CPU} if pinned else None
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    if args.nice:
        os.nice(args.nice)  # children inherit it: both servers, Redis, the publisher
    nofile = procs.raise_nofile()
    fanout = [w for w in args.workloads if w in FANOUT_WORKLOADS]
    ingest = [w for w in args.workloads if w not in FANOUT_WORKLOADS]
    needed = (
        max(
            args.idle,
            args.storm,
            args.w1[0],
            args.w2[0],
            args.w2slow[0],
            args.bus_storm if "bus-storm" in ingest else 0,
        )
        + 200
    )
    if nofile < needed:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}; this run needs {needed}: raise the hard limit (ulimit -Hn)")
    nchan_state = args.nchan_state
    print(
        environment_line(pinned, nchan_state if nchan_state != "nchan" else "Nchan (nginx-light, 1 worker)", args.nice),
        flush=True,
    )
    max_users = max(args.idle, args.storm, args.w1[0], args.w2[0], args.w2slow[0], 100)
    # Children are started from the main thread: PR_SET_PDEATHSIG follows the thread that forked.
    servers: list[Server] = []
    rows: list[Row] = []
    ingest_rows: list[IngestRow] = []
    try:
        if fanout:
            servers.append(PushServer(server_cpus, client_cpus, max_users, **dict(args.node_setting)))
            if nchan_state == "nchan":
                servers.append(NchanServer(server_cpus))
            rows = await run_workloads(args, servers)
        if ingest:
            # Its own Redis and node: nothing left from the fan-out, and a push limit no ingest rate reaches.
            ingest_server = PushServer(server_cpus, client_cpus, max(args.bus_storm, 100), **INGEST_SETTINGS)
            servers.append(ingest_server)
            ingest_rows = await run_ingest(args, ingest_server)
    finally:
        for server in reversed(servers):
            server.stop()
    summary = compare(rows)
    fast_rows = [r for r in rows if r.reader is None]
    slow_rows = [r for r in rows if r.reader is not None]
    if fast_rows:
        print()
        print(render_table(sorted(fast_rows, key=lambda r: (fanout.index(_kind(r)), r.server != "delta-push"))))
    if slow_rows:
        print()
        print(render_table(slow_rows, SLOW_COLUMNS))
    if rows:
        print()
        print(render_comparison(summary))
    if ingest_rows:
        print()
        print(render_table(ingest_rows, INGEST_COLUMNS))
    notes = [f"{r.workload} / {r.server}: {r.note}" for r in rows if r.note]
    notes += [f"{r.workload} / {r.server}: errors {r.errors}" for r in rows if r.errors]
    notes += [f"{r.workload} / {r.server}: {r.lagged} events reported lagged" for r in rows if r.lagged]
    notes += [
        f"{r.workload} / {r.server}: closed by the server, by code: {r.close_codes}" for r in rows if r.close_codes
    ]
    notes += [
        f"{r.workload} / {r.server}: CPU {SERVER_CPU} was {r.server_core_busy:.0%} busy but the server used "
        f"{r.server_cpu:.0%}: other processes competed for its core, so this row is disturbed — rerun on a quiet machine"
        for r in rows
        if r.server_core_busy is not None
        and r.server_cpu is not None
        and r.server_core_busy - r.server_cpu > INTERFERENCE
    ]
    notes += [f"{r.workload}: {r.note}" for r in ingest_rows if r.note]
    notes += [f"{r.workload}: errors {r.errors}" for r in ingest_rows if r.errors]
    notes += [f"{r.workload}: {r.lagged} events reported lagged" for r in ingest_rows if r.lagged]
    notes += [
        f"{r.workload}: CPU {SERVER_CPU} was {r.server_core_busy:.0%} busy but the node used {r.server_cpu:.0%}: "
        "other processes competed for its core — rerun on a quiet machine"
        for r in ingest_rows
        if r.server_core_busy is not None
        and r.server_cpu is not None
        and r.server_core_busy - r.server_cpu > INTERFERENCE
    ]
    for note in notes:
        print("note: " + note)
    if nchan_state not in ("nchan",) and not args.no_nchan and fanout:
        print(f"note: Nchan reference skipped: {nchan_state}")
    result = {
        "rows": [asdict(r) for r in rows],
        **summary,
        "nchan": nchan_state,
        "ingest": [asdict(r) for r in ingest_rows],
    }
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return result


def _kind(row: Row) -> str:
    return row.workload.split()[0].lower()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.w1, args.w2, args.duration, args.idle, args.storm = (200, 20.0), (400, 50.0), 4.0, 500, 1000
        args.w2slow = (400, 50.0)
        args.warmup = min(args.warmup, 1.0)
        args.ingest_events, args.bus_storm, args.ingest_idle = 5000, 1000, 1.0
    args.workloads = expand_workloads(args.workloads)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)

    if args.no_nchan:
        args.nchan_state = "skipped (--no-nchan)"
    elif not set(args.workloads) & set(FANOUT_WORKLOADS):
        args.nchan_state = "not needed (no fan-out workload)"
    else:
        args.nchan_state = ensure_nchan(not args.no_install) or "nchan"

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(amain(args), args.max_seconds)

    try:
        uvloop.run(bounded())
    except TimeoutError:
        print(f"bench: aborted after {args.max_seconds:g} s", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
