"""Starting and stopping the processes a load run needs: redis-server, push nodes, a router.

Shared by the benchmark (:mod:`loadtest.bench`) and the locust wrapper
(:mod:`loadtest.run`). Every child is started with ``PR_SET_PDEATHSIG`` so it
dies with the load tool even if that is killed with SIGKILL, may be pinned to a
CPU set, and is stopped by :meth:`Child.stop` (SIGTERM, then SIGKILL after a
bounded wait). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 20.0
BENCH_JWT_SECRET = "delta-push-loadtest-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def child_setup(cpus: set[int] | None, death_signal: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(PR_SET_PDEATHSIG, death_signal)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


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
                preexec_fn=child_setup(cpus, death_signal),
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{what}: {child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_redis(cpus: set[int] | None = None) -> tuple[Child, str]:
    """A private redis-server on a free port; returns it and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    child = Child(
        f"redis-{port}",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "10000",
        ],
        cpus=cpus,
    )
    wait_for(lambda: port_open(port), START_TIMEOUT, "redis-server", child)
    return child, f"redis://127.0.0.1:{port}/0"


def push_env(**settings: str) -> dict[str, str]:
    """The environment of a node or router: ours, with a known JWT secret, without inherited PUSH_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_") and k != "REDIS_URL"}
    env.update({"PUSH_JWT_SECRET": BENCH_JWT_SECRET, "PUSH_DRAIN_SECONDS": "0.5", "PYTHONPATH": str(ROOT)})
    env.update(settings)
    return env


def start_node(
    redis_url: str, *, node_id: str = "load-1", port: int | None = None, cpus: set[int] | None = None, **settings: str
) -> tuple[Child, int]:
    """`pushctl node` (as ``python -m pushctl.cli node``) on a free port, waited for /readyz."""
    port = port or free_port()
    argv = [sys.executable, "-m", "pushctl.cli", "node", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--node-id", node_id, "--redis-url", redis_url]
    child = Child(f"node-{node_id}-{port}", argv, env=push_env(**settings), cpus=cpus)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), START_TIMEOUT, f"node {node_id}", child)
    return child, port


def router_available() -> bool:
    """Whether this checkout has `pushctl router` (it is being built separately)."""
    probe = subprocess.run(
        [sys.executable, "-m", "pushctl.cli", "router", "--help"],
        cwd=ROOT,
        env=push_env(),
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def start_router(redis_url: str, *, port: int | None = None, **settings: str) -> tuple[Child, int]:
    port = port or free_port()
    argv = [sys.executable, "-m", "pushctl.cli", "router", "--host", "127.0.0.1", "--port", str(port)]
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
