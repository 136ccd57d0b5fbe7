"""Starting and stopping the processes a load run needs: redis-server, push nodes, a router.

Shared by the benchmark (:mod:`loadtest.bench`) and the locust wrapper
(:mod:`loadtest.run`), on top of the project's one launcher (:mod:`pushctl.launch`). Every child is started with ``PR_SET_PDEATHSIG`` so it
dies with the load tool even if that is killed with SIGKILL, may be pinned to a
CPU set, and is stopped by :meth:`Child.stop` (SIGTERM, then SIGKILL after a
bounded wait). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from pushctl.launch import (
    ROOT,
    die_with_parent,
    free_port,
    http_ok,
    pushctl_argv,
    redis_server_argv,
    service_env,
    stop,
    wait_until,
)

START_TIMEOUT = 20.0
BENCH_JWT_SECRET = "delta-push-loadtest-secret-0123456789abcdef"


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_setup(cpus: set[int] | None, death_signal: int) -> Callable[[], None]:
    """A ``preexec_fn`` for children the benchmark starts itself (pinned, dying with it)."""
    return die_with_parent(death_signal, cpus)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


class Child:
    """One child process with a log file, stopped on :meth:`stop` or when its parent dies."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        death_signal: int = signal.SIGKILL,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log_path = Path(tempfile.gettempdir()) / f"delta-push-load-{name}-{os.getpid()}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(death_signal, cpus),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        stop(self.proc, timeout)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, child: Child | None = None) -> None:
    try:
        if child is None:
            wait_until(condition, timeout, what)
        else:
            wait_until(condition, timeout, f"{what} ({child.name})", child.proc, child.log_tail)
    except TimeoutError as exc:
        raise RuntimeError(str(exc)) from None


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_redis(cpus: set[int] | None = None) -> tuple[Child, str]:
    """A private redis-server on a free port; returns it and its URL."""
    port = free_port()
    try:
        argv = redis_server_argv(port, "--maxclients", "10000")
    except FileNotFoundError as exc:
        raise RuntimeError(str(exc)) from None
    child = Child(f"redis-{port}", argv, cpus=cpus)
    wait_for(lambda: port_open(port), START_TIMEOUT, "redis-server", child)
    return child, f"redis://127.0.0.1:{port}/0"


def parse_node_setting(text: str) -> tuple[str, str]:
    """``PUSH_NAME=VALUE`` from a ``--node-setting`` flag (an argparse type)."""
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("PUSH_"):
        raise argparse.ArgumentTypeError(f"expected PUSH_NAME=VALUE, got {text!r}")
    return name, value


def push_env(**settings: str) -> dict[str, str]:
    """The environment of a node or router: ours, with a known JWT secret, without inherited PUSH_*."""
    return service_env({"PUSH_JWT_SECRET": BENCH_JWT_SECRET, "PUSH_DRAIN_SECONDS": "0.5", **settings})


def start_node(
    redis_url: str, *, node_id: str = "load-1", port: int | None = None, cpus: set[int] | None = None, **settings: str
) -> tuple[Child, int]:
    """`pushctl node` (as ``python -m pushctl.cli node``) on a free port, waited for /readyz."""
    port = port or free_port()
    argv = pushctl_argv("node", "--host", "127.0.0.1", "--port", str(port))
    argv += ["--node-id", node_id, "--redis-url", redis_url]
    child = Child(f"node-{node_id}-{port}", argv, env=push_env(**settings), cpus=cpus)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), START_TIMEOUT, f"node {node_id}", child)
    return child, port


def router_available() -> bool:
    """Whether this checkout has `pushctl router` (it is being built separately)."""
    probe = subprocess.run(
        pushctl_argv("router", "--help"),
        cwd=ROOT,
        env=push_env(),
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def start_router(redis_url: str, *, port: int | None = None, **settings: str) -> tuple[Child, int]:
    port = port or free_port()
    argv = pushctl_argv("router", "--host", "127.0.0.1", "--port", str(port))
    argv += ["--redis-url", redis_url]
    child = Child(f"router-{port}", argv, env=push_env(**settings))
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), START_TIMEOUT, "router", child)
    return child, port


def stop_all(children: list[Child]) -> None:
    """Stop children in reverse start order; never raises."""
    for child in reversed(children):
        with contextlib.suppress(Exception):
            child.stop()
    children.clear()
