"""Running one delta-push server process: listen, wait for a stop signal, drain, exit.

Nodes and routers share this: the listen backlog comes from settings (sized for
reconnect storms; aiohttp's default of 128 makes 5,000 simultaneous connects take
over a minute), SIGTERM and SIGINT start a graceful stop, and the event loop is
uvloop when it is installed.

The port is bound before the app starts (before a node joins the ring): a process
that cannot listen exits at once with one line instead of being routable while it
serves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from aiohttp import web

from cluster.metrics import render
from cluster.settings import Settings


class StartupError(Exception):
    """A process cannot start (or must not stay up); the message is the one line it exits with."""


class Service(Protocol):
    """What a process runs beside its HTTP server (background tasks, connections to Redis)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def metrics(request: web.Request) -> web.Response:
    body, content_type = render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def add_metrics_route(app: web.Application, settings: Settings) -> None:
    """``/metrics`` on the main port, unless ``PUSH_METRICS_PORT`` gives it a listener of its own.

    A separate port keeps the metrics off whatever exposes the client port (a
    public load balancer in front of routers): internals such as node names,
    connection counts and rejection rates are for the scraper only.
    """
    if not settings.metrics_port:
        app.router.add_get("/metrics", metrics)


async def _start_metrics_listener(settings: Settings) -> web.AppRunner | None:
    if not settings.metrics_port:
        return None
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.metrics_port, reuse_address=True).start()
    return runner


def run_with_app(app: web.Application, service: Service) -> None:
    """Start ``service`` when ``app`` starts and stop it when the app is cleaned up."""

    async def on_startup(app: web.Application) -> None:
        await service.start()

    async def on_cleanup(app: web.Application) -> None:
        await service.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen now, so nothing that depends on being reachable starts on a port in use."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(f"cannot listen on {host}:{port}: {reason} (pick another --port)") from None
    sock.setblocking(False)
    return sock


async def serve_app(
    app: web.Application,
    settings: Settings,
    stop: asyncio.Event | None,
    *,
    started: Callable[[], None],
    drain: Callable[[], Awaitable[None]],
    front: Callable[[web.Server], Callable[[], asyncio.BaseProtocol]] | None = None,
) -> None:
    """Serve ``app`` until ``stop`` is set or SIGTERM/SIGINT arrives, then ``drain`` and clean up.

    ``front``, given aiohttp's protocol factory for the app, returns the protocol
    factory the port listens with instead of aiohttp's (the node's own WebSocket
    upgrade, :mod:`node.front`). Raises :class:`StartupError` before the app
    starts if the port cannot be bound.
    """
    sock = listen(settings.host, settings.port, settings.listen_backlog)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    metrics_runner: web.AppRunner | None = None
    server: asyncio.AbstractServer | None = None
    try:
        await runner.setup()
        if front is None:
            await web.SockSite(runner, sock, backlog=settings.listen_backlog).start()
        else:
            assert runner.server is not None
            server = await loop.create_server(front(runner.server), sock=sock, backlog=settings.listen_backlog)
        metrics_runner = await _start_metrics_listener(settings)
        started()
        await stop.wait()
        await drain()
    finally:
        if server is not None:
            server.close()  # stop accepting; the node's drain has closed its WebSockets
        await runner.cleanup()
        sock.close()
        if metrics_runner is not None:  # last: the drain stays visible to the scraper
            await metrics_runner.cleanup()


def run_process(name: str, main: Coroutine[Any, Any, Any]) -> None:
    """Run a server process; a :class:`StartupError` is one line on stderr and exit code 1, no traceback."""
    try:
        run_loop(main)
    except StartupError as exc:
        print(f"pushctl {name}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def run_loop(main: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine on uvloop (asyncio's loop if uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        asyncio.run(main)
    else:
        uvloop.run(main)
