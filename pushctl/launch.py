"""Starting and stopping delta-push's processes: the one launcher of ``pushctl up``, the load
tests (``loadtest/procs.py``) and the test fixtures (``tests/conftest.py``).

Everything listens on 127.0.0.1 unless told otherwise. A child can be made to die with its
parent (Linux ``PR_SET_PDEATHSIG``), so a killed ``up``, load run or pytest leaves nothing
behind; stopping is SIGTERM (a node or router drains), then SIGKILL after a bounded grace.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.05


def free_port() -> int:
    """A TCP port nobody listens on now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 within a second (``/readyz``, ``/healthz``)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def pushctl_argv(*args: str) -> list[str]:
    """``pushctl …`` as this interpreter runs it (no dependency on the console script's path)."""
    return [sys.executable, "-m", "pushctl", *args]


def redis_server_argv(port: int, *extra: str) -> list[str]:
    """A private, non-persistent ``redis-server`` on 127.0.0.1:``port``; raises if none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server)")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra]


def service_env(extra: Mapping[str, str] | None = None, *, inherit_settings: bool = False) -> dict[str, str]:
    """A child's environment: ours (without inherited ``PUSH_*``/``REDIS_URL`` unless told), the
    checkout on ``PYTHONPATH``, then ``extra``."""
    env = dict(os.environ)
    if not inherit_settings:
        env = {k: v for k, v in env.items() if not k.startswith("PUSH_") and k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def die_with_parent(death_signal: int = signal.SIGTERM, cpus: set[int] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``death_signal`` when its parent dies (and runs on ``cpus``)."""

    def setup() -> None:
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, death_signal)
        except (OSError, AttributeError):
            pass  # not Linux: children then outlive a killed parent
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    describe: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` until true; raises when ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = f":\n{describe()}" if describe is not None else ""
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}{detail}")
        if condition():
            return
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen[bytes], grace: float, *, signalled: bool = False) -> int | None:
    """SIGTERM (unless already sent), then SIGKILL after ``grace`` seconds; returns the exit code."""
    if proc.poll() is None:
        if not signalled:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
