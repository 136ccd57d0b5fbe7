"""``pushctl up``: a whole local cluster in one command (SPEC §10).

Picks its event bus in this order and says which: the Redis at ``REDIS_URL``
if it answers and no cluster is live on it; else a private ``redis-server``
started on a free port (if the binary is installed); else one in-process node
and router sharing an in-memory bus and membership. A second ``up`` on the same
machine therefore gets a Redis of its own instead of taking over the first
one's node ids (Redis pub/sub channels are not per database, so a db number
alone would not keep two buses apart). The router listens on ``--port`` (8080) and
nodes on the ports after it (8081…), each a ``python -m pushctl.cli``
subprocess in its own session, so Ctrl-C reaches only ``up``, which then stops
them in order (router and nodes drain, then the private Redis) and exits.
Children also get SIGTERM if ``up`` itself dies (Linux ``PR_SET_PDEATHSIG``).

If ``PUSH_JWT_SECRET`` is unset a random one is generated, handed to the
children and printed with the command that makes a token; a placeholder or a
short one is refused, as ``pushctl node`` and ``pushctl router`` refuse it.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields, replace
from typing import Any

from cluster.settings import Settings, add_setting_flags, settings_from_args
from pushctl.launch import (
    ROOT,
    die_with_parent,
    free_port,
    http_ok,
    port_free,
    pushctl_argv,
    redis_server_argv,
    service_env,
    stop,
)

ROUTER_PORT = 8080
PER_PROCESS = {"host", "port", "node_id", "public_url", "internal_url", "metrics_port"}
"""Settings ``up`` chooses for each process itself."""
START_TIMEOUT_SECONDS = 20.0
STOP_GRACE_SECONDS = 5.0


def add_up_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="number of push nodes (default 3)")
    parser.add_argument(
        "--port", type=int, default=ROUTER_PORT, help=f"router port (default {ROUTER_PORT}); nodes use the next ones"
    )
    add_setting_flags(parser, [f.name for f in fields(Settings) if f.name not in PER_PROCESS])


def up(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.jwt_secret:  # before anything starts: a configuration error comes first
        from cluster.auth import require_strong_secret

        require_strong_secret(settings.jwt_secret, "pushctl up")
    if args.nodes < 1:
        print("pushctl up: --nodes must be at least 1", file=sys.stderr)
        return 2
    ports = [args.port + i for i in range(args.nodes + 1)]
    busy = [port for port in ports if not port_free(settings.host, port)]
    if busy:
        print(f"pushctl up: port(s) {', '.join(map(str, busy))} already in use (try --port)", file=sys.stderr)
        return 1
    if not settings.jwt_secret:
        settings = replace(settings, jwt_secret=secrets.token_urlsafe(32))
        print("pushctl up: PUSH_JWT_SECRET was not set; generated one for this cluster. In the shell where you")
        print("  make tokens (.venv/bin/pushctl token --sub alice; add --admin for /v1/cluster), first run:")
        print(f"  export PUSH_JWT_SECRET={settings.jwt_secret}", flush=True)

    why = f"no Redis at {safe_url(settings.redis_url)}"
    if _redis_answers(settings.redis_url):
        live = _live_nodes(settings.redis_url)
        if not live:
            print(f"pushctl up: using the Redis at {safe_url(settings.redis_url)} (REDIS_URL)", flush=True)
            return LocalCluster(settings, ports, args, redis=None).run()
        why = (
            f"the Redis at {safe_url(settings.redis_url)} already serves a live cluster ({', '.join(live[:4])}"
            f"{' …' if len(live) > 4 else ''}: another `pushctl up`?), which this one must not join"
        )
    binary = shutil.which("redis-server")
    if binary is not None:
        redis = PrivateRedis(binary)
        print(f"pushctl up: {why}; starting a private redis-server on {redis.url}", flush=True)
        if not redis.start():
            print("pushctl up: the private redis-server did not start", file=sys.stderr)
            redis.stop()
            return 1
        return LocalCluster(replace(settings, redis_url=redis.url), ports, args, redis=redis).run()
    print(
        f"pushctl up: {why} and no redis-server is installed: running ONE in-process "
        "node with an in-memory bus (events can only come from inside this process; --nodes is ignored)"
    )
    return run_in_process(settings, ports[0], ports[1])


class PrivateRedis:
    """A throwaway redis-server on a free port, without persistence."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        self.proc = subprocess.Popen(
            redis_server_argv(self.port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _redis_answers(self.url):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, STOP_GRACE_SECONDS)
            self.proc = None


class LocalCluster:
    """A router and N nodes as subprocesses, stopped together."""

    def __init__(self, settings: Settings, ports: list[int], args: argparse.Namespace, redis: PrivateRedis | None):
        self.settings = settings
        self.ports = ports
        self.redis = redis
        self.env = _child_env(settings, args)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()

    def _spawn(self, name: str, command: list[str]) -> None:
        self.procs[name] = subprocess.Popen(
            pushctl_argv(*command, "--redis-url", self.settings.redis_url),
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            host = "127.0.0.1"
            router_port, node_ports = self.ports[0], self.ports[1:]
            names = [f"node-{i}" for i in range(1, len(node_ports) + 1)]
            print(f"pushctl up: starting {', '.join(names)} on ports {node_ports[0]}..{node_ports[-1]}", flush=True)
            for name, port in zip(names, node_ports, strict=True):
                self._spawn(name, ["node", "--port", str(port), "--node-id", name])
            print(f"pushctl up: starting the router on port {router_port}", flush=True)
            self._spawn("router", ["router", "--port", str(router_port)])
            checks = dict(zip(names, node_ports, strict=True)) | {"router": router_port}
            if not self._wait_ready(host, checks):
                return 0 if self.stopping.is_set() else 1
            print(f"router  ws://{host}:{router_port}/ws   http://{host}:{router_port}/readyz  /v1/route  /v1/cluster")
            for name, port in zip(names, node_ports, strict=True):
                print(f"{name}  ws://{host}:{port}/ws")
            print(f"live page  http://{host}:{router_port}/   (add ?token=... to see a user's private events)")
            print("pushctl up: ready. Ctrl-C stops everything.", flush=True)
            self._watch()
            return 0
        finally:
            self._stop_all()

    def _wait_ready(self, host: str, checks: dict[str, int]) -> bool:
        began = time.monotonic()
        deadline = began + START_TIMEOUT_SECONDS
        waiting = dict(checks)
        while waiting:
            if self.stopping.is_set():
                return False
            for name, port in list(waiting.items()):
                code = self.procs[name].poll()
                if code is not None:
                    print(f"pushctl up: {name} exited with code {code} while starting", file=sys.stderr)
                    return False
                if http_ok(f"http://{host}:{port}/readyz"):
                    del waiting[name]
                    print(f"pushctl up: {name} ready ({time.monotonic() - began:.1f} s)", flush=True)
            if time.monotonic() > deadline:
                print(f"pushctl up: not ready in time: {', '.join(waiting)}", file=sys.stderr)
                return False
            time.sleep(0.1)
        return True

    def _watch(self) -> None:
        reported: set[str] = set()
        while not self.stopping.wait(0.5):
            for name, proc in self.procs.items():
                code = proc.poll()
                if code is not None and name not in reported:
                    reported.add(name)
                    print(f"pushctl up: {name} exited with code {code}", file=sys.stderr, flush=True)

    def _stop_all(self) -> None:
        """Router and nodes drain together (SIGTERM), then the private Redis goes."""
        if self.procs:
            print("pushctl up: stopping", flush=True)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        grace = self.settings.drain_seconds + STOP_GRACE_SECONDS
        for proc in self.procs.values():
            stop(proc, grace, signalled=True)
        if self.redis is not None:
            self.redis.stop()
        if self.procs:
            print("pushctl up: stopped", flush=True)


def run_in_process(settings: Settings, router_port: int, node_port: int) -> int:
    """One node and one router in this process on an in-memory bus and membership."""
    import asyncio

    from cluster.broker import MemoryBroker
    from cluster.logs import configure
    from cluster.membership import MemoryMembership
    from cluster.process import StartupError, run_loop
    from node.app import serve as serve_node
    from router.app import serve as serve_router

    configure(settings.log_level)
    print(f"router  ws://127.0.0.1:{router_port}/ws   http://127.0.0.1:{router_port}/readyz")
    print(f"node-1  ws://127.0.0.1:{node_port}/ws")
    print(f"live page  http://127.0.0.1:{router_port}/")
    print("pushctl up: Ctrl-C stops everything.", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        membership = MemoryMembership(settings.heartbeat_seconds, settings.node_ttl_seconds)
        await asyncio.gather(
            serve_node(replace(settings, port=node_port, node_id="node-1"), MemoryBroker(), stop, membership),
            serve_router(replace(settings, port=router_port), stop, membership),
        )

    try:
        run_loop(main())
    except StartupError as exc:
        print(f"pushctl up: {exc}", file=sys.stderr, flush=True)
        return 1
    print("pushctl up: stopped", flush=True)
    return 0


def _child_env(settings: Settings, args: argparse.Namespace) -> dict[str, str]:
    """The environment of every child: ours, plus each setting given as a flag, plus the JWT secret."""
    env: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in PER_PROCESS:
            env[f.metadata["env"]] = _env_value(value)
    env["PUSH_JWT_SECRET"] = settings.jwt_secret
    child = service_env(env, inherit_settings=True)
    for per_process in ("PUSH_PORT", "PUSH_NODE_ID", "PUSH_METRICS_PORT"):  # one port cannot serve every child
        child.pop(per_process, None)
    return child


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _redis_answers(url: str) -> bool:
    import redis

    from cluster.redis_url import sync_client

    try:
        client = sync_client(url, socket_connect_timeout=1, socket_timeout=1)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError):
        return False  # a cluster client reads the slot map at once: an unreachable cluster fails here
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError):
        return False
    finally:
        client.close()


def _live_nodes(url: str) -> list[str]:
    """Ids of the nodes whose membership lease is still running on the Redis at ``url``."""
    import redis

    from cluster.membership import NODES_KEY
    from cluster.redis_url import sync_client

    errors = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
    try:
        client = sync_client(url, socket_connect_timeout=1, socket_timeout=1)
    except errors:
        return []
    try:
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        return sorted(_text(node_id) for node_id in client.zrangebyscore(NODES_KEY, now_ms, "+inf"))
    except errors:
        return []
    finally:
        client.close()


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def safe_url(url: str) -> str:
    """A Redis URL without its password, for printing."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
