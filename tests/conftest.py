"""Fixtures that start real processes: a private redis-server and `pushctl node`s.

Nothing here is mocked: tests speak the wire protocol over TCP to real nodes
that use a real Redis started on a free port, so Redis can be killed and
restarted under a live subscription.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from cluster import protocol
from pushctl.launch import ROOT, free_port, pushctl_argv, redis_server_argv, service_env, stop

PUSHCTL = pushctl_argv()
JWT_SECRET = "test-secret-for-delta-push-0123456789abcdef"
START_TIMEOUT = 15.0


def wait_until(condition: Any, timeout: float = 10.0, interval: float = 0.05, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")


async def async_wait_until(condition: Any, timeout: float = 10.0, interval: float = 0.05, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")


class RedisProcess:
    """A private redis-server on a free port that tests may stop and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            argv = redis_server_argv(self.port)
        except FileNotFoundError:
            pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_until(up, START_TIMEOUT, message="redis-server to start")
        client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class NodeProcess:
    """A `pushctl node` subprocess."""

    def __init__(self, port: int, node_id: str, redis_url: str, env: dict[str, str], args: list[str]) -> None:
        self.port = port
        self.node_id = node_id
        self.redis_url = redis_url
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.http = f"http://127.0.0.1:{port}"
        self.env = env
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(f"/tmp/delta-push-test-node-{node_id}-{port}.log")

    def start(self) -> None:
        cmd = [*PUSHCTL, "node", "--port", str(self.port), "--node-id", self.node_id, "--redis-url", self.redis_url]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([*cmd, *self.args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready, START_TIMEOUT, message=f"node {self.node_id} /readyz")

    def ready(self) -> bool:
        import urllib.request

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.http + "/readyz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log().splitlines():
            try:
                lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return lines

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.http + "/metrics", timeout=5) as response:
            return response.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample, 0 if absent."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0

    def stop(self, sig: int | None = None) -> int | None:
        if self.proc is None:
            return None
        if sig is not None:
            self.proc.send_signal(sig)
        code = stop(self.proc, 20, signalled=sig is not None)
        self.proc = None
        return code


def node_env(**settings: str) -> dict[str, str]:
    """A test node's environment (the defaults a user gets, with the tests' secret)."""
    return service_env({"PUSH_JWT_SECRET": JWT_SECRET, "PUSH_DRAIN_SECONDS": "0.5", **settings})


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess(free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    """A Redis of the test's own, for tests that kill or flush it."""
    server = RedisProcess(free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture
def start_node(redis_server: RedisProcess) -> Iterator[Any]:
    """Start `pushctl node` processes: start_node(node_id=..., redis=..., env={...}, args=[...])."""
    started: list[NodeProcess] = []

    def start(node_id: str | None = None, redis: RedisProcess | None = None, args: list[str] | None = None, **env: str) -> NodeProcess:
        node = NodeProcess(
            free_port(),
            node_id or f"node-{len(started) + 1}",
            (redis or redis_server).url,
            node_env(**env),
            args or [],
        )
        started.append(node)
        node.start()
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture(scope="module")
def shared_node(redis_server: RedisProcess) -> Iterator[NodeProcess]:
    """One node for a whole module of tests that do not change its settings."""
    node = NodeProcess(free_port(), "shared", redis_server.url, node_env(), [])
    node.start()
    yield node
    node.stop()


def token(sub: str, ttl: int = 3600, roles: list[str] | None = None, sid: str | None = None, secret: str = JWT_SECRET) -> str:
    from cluster.auth import issue_token

    return issue_token(secret, sub, ttl_seconds=ttl, roles=roles, sid=sid)


class WsClient:
    """A test client speaking the wire protocol."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    async def send(self, doc: dict[str, Any] | str) -> None:
        await self.ws.send_str(doc if isinstance(doc, str) else orjson.dumps(doc).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionClosed(self.ws.close_code, msg)
        return orjson.loads(msg.data)

    async def recv_action(self, action: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message with this action (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            doc = await self.recv(max(0.01, deadline - time.monotonic()))
            if doc.get("action") == action:
                return doc

    async def subscribe(self, channels: list[str], request_id: str = "s", **options: Any) -> dict[str, Any]:
        """Subscribe (options: priority, limit, since) and return the ack."""
        await self.send(protocol.subscribe_request(channels, request_id, **options))
        return await self.recv_action("ack")

    async def events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        received = []
        deadline = time.monotonic() + timeout
        while len(received) < count:
            received.append(await self.recv_action("event", max(0.01, deadline - time.monotonic())))
        return received

    async def no_event(self, within: float = 0.5) -> None:
        """Assert that no event arrives within ``within`` seconds."""
        try:
            doc = await self.recv_action("event", within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected event: {doc}")

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; returns the close code."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code
            if msg.type is aiohttp.WSMsgType.ERROR:
                return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


class ConnectionClosed(Exception):
    def __init__(self, code: int | None, msg: Any) -> None:
        super().__init__(f"connection closed ({code}): {msg}")
        self.code = code


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """connect(node_or_url, token=None, headers=None, expect_welcome=True) -> WsClient."""
    clients: list[WsClient] = []

    async def open_client(target: Any, token: str | None = None, headers: dict[str, str] | None = None,
                          expect_welcome: bool = True) -> WsClient:
        url = target if isinstance(target, str) else target.url
        session = aiohttp.ClientSession()
        params = {"token": token} if token else None
        ws = await session.ws_connect(url, params=params, headers=headers, autoclose=False, max_msg_size=0)
        client = WsClient(session, ws)
        clients.append(client)
        if expect_welcome:
            client.welcome = await client.recv()
            assert client.welcome["action"] == "welcome", client.welcome
        return client

    yield open_client
    for client in clients:
        await client.close()


def publish_raw(redis_url: str, channel: str, data: bytes | str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.publish(channel, data))
    finally:
        client.close()


def publish(redis_url: str, event_type: str, payload: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Publish one event through the SDK; returns the envelope."""
    from cluster.events import DEFAULT_SOURCE_BY_DOMAIN, SyncEventPublisher

    publisher = SyncEventPublisher(redis_url, DEFAULT_SOURCE_BY_DOMAIN[event_type.partition(".")[0]])
    try:
        return publisher.publish(event_type, payload if payload is not None else {}, **kwargs)
    finally:
        publisher.close()


# --- routers and whole clusters (SPEC §7) ------------------------------------------------


class RouterProcess(NodeProcess):
    """A `pushctl router` subprocess; ready means Redis is reachable and at least one node is live."""

    def __init__(self, port: int, redis_url: str, env: dict[str, str], args: list[str], wait_ready: bool = True) -> None:
        super().__init__(port, "router", redis_url, env, args)
        self.log_path = Path(f"/tmp/delta-push-test-router-{port}.log")
        self.wait_ready = wait_ready

    def start(self) -> None:
        cmd = [*PUSHCTL, "router", "--port", str(self.port), "--redis-url", self.redis_url]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([*cmd, *self.args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready if self.wait_ready else self.alive, START_TIMEOUT, message="router to start")

    def alive(self) -> bool:
        import urllib.request

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"router exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.http + "/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        """GET a router endpoint: (status, parsed JSON body)."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.http + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read() or b"null")


@pytest.fixture
def start_router(redis_server: RedisProcess) -> Iterator[Any]:
    """Start `pushctl router` processes: start_router(redis=..., wait_ready=True, args=[...], **env)."""
    started: list[RouterProcess] = []

    def start(redis: RedisProcess | None = None, args: list[str] | None = None, wait_ready: bool = True,
              **env: str) -> RouterProcess:
        router = RouterProcess(free_port(), (redis or redis_server).url, node_env(**env), args or [], wait_ready)
        started.append(router)
        router.start()
        return router

    yield start
    for router in started:
        router.stop()


def start_nodes(redis: RedisProcess, node_ids: list[str], **env: str) -> list[NodeProcess]:
    """Start several `pushctl node` processes at once (the caller stops them)."""
    from concurrent.futures import ThreadPoolExecutor

    nodes = [NodeProcess(free_port(), node_id, redis.url, node_env(**env), []) for node_id in node_ids]
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(NodeProcess.start, nodes))
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


UNLIMITED_ROUTER = {"PUSH_ROUTER_IP_RATE": "1000000", "PUSH_ROUTER_IP_BURST": "1000000"}
"""Router settings for tests that open many connections from 127.0.0.1 on purpose."""


async def route_many(router: RouterProcess, users: list[str], concurrency: int = 64) -> dict[str, str]:
    """user -> node id, from the router's GET /v1/route with each user's token."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(user: str) -> tuple[str, str]:
            async with session.get(router.http + "/v1/route", params={"token": token(user)}) as response:
                assert response.status == 200, await response.text()
                body = await response.json()
                return user, body["node"]

        return dict(await asyncio.gather(*(one(user) for user in users)))


def users_by_owner(routes: dict[str, str]) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for user, node in routes.items():
        owners.setdefault(node, []).append(user)
    return owners


# --- `pushctl up` (SPEC §10) ---------------------------------------------------------------


def ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def up_router_port(nodes: int) -> tuple[int, str | None]:
    """8080 if it and the node ports after it are free, else a free range (and why)."""
    if ports_free(8080, nodes + 1):
        return 8080, None
    for _ in range(50):
        base = free_port()
        if base + nodes < 65536 and ports_free(base, nodes + 1):
            return base, "port 8080 (or 8081..) is busy on this machine: `pushctl up` tested with --port"
    pytest.fail("no free port range for pushctl up")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except OSError:
        return 0


class Up:
    def __init__(self, nodes: int, env: dict[str, str]) -> None:
        self.port, self.note = up_router_port(nodes)
        args = ["up", "--nodes", str(nodes)] + ([] if self.port == 8080 else ["--port", str(self.port)])
        self.log_path = Path(f"/tmp/delta-push-test-up-{self.port}.log")
        self.proc = subprocess.Popen(
            [*PUSHCTL, *args], env=env, cwd=ROOT, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        """Every process answered /readyz (up says so) and the router does now."""
        if self.proc.poll() is not None:
            raise AssertionError(f"pushctl up exited with {self.proc.returncode}:\n{self.output()}")
        return "Ctrl-C stops everything" in self.output() and http_status(f"http://127.0.0.1:{self.port}/readyz") == 200

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def up_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_") and k != "REDIS_URL"}
    env.update({"PYTHONPATH": str(ROOT), "PUSH_DRAIN_SECONDS": "0.5", **extra})
    return env
