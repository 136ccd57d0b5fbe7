"""What the locust suites share: a gevent-friendly WebSocket client and the PASS/FAIL verdict.

Locust monkey-patches the standard library for gevent, so the blocking
``websocket-client`` library cooperates with it: one greenlet per connection.
Every wait here has a timeout and every loop a bound.

A suite records failures in a :class:`Verdict`; at the end, the ``quitting``
hook sets ``environment.process_exit_code`` (0 PASS, 1 FAIL) and, once locust
has printed its statistics, the last line printed is ``PASS: …`` or ``FAIL: …``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import websocket
from locust import events
from locust.env import Environment

from cluster import protocol

DEFAULT_JWT_SECRET_ENV = "PUSH_JWT_SECRET"


class Closed(Exception):
    """The server closed the connection; ``code`` is its close code (None if the TCP connection just ended)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed ({code})")
        self.code = code


class PushSocket:
    """One delta-push WebSocket connection, blocking and gevent-friendly."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        full = url if token is None else f"{url}{'&' if '?' in url else '?'}token={token}"
        self.ws = websocket.create_connection(full, timeout=timeout, enable_multithread=False)
        self.close_code: int | None = None

    def send(self, frame: str) -> None:
        """Send one client message, built with :mod:`cluster.protocol` (``subscribe_request``, …)."""
        self.ws.send(frame)

    def recv(self, timeout: float) -> dict[str, Any] | None:
        """The next protocol message, None on timeout; raises :class:`Closed`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.ws.settimeout(remaining)
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                return None
            except (websocket.WebSocketConnectionClosedException, OSError):
                raise Closed(self.close_code) from None
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                raise Closed(self.close_code)
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                return protocol.parse_server_message(data).doc

    def recv_action(self, action: str, timeout: float) -> dict[str, Any] | None:
        """The next message with this action (others are skipped), None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.recv(deadline - time.monotonic())
            if doc is None or doc.get("action") == action:
                return doc

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except (websocket.WebSocketException, OSError):
            pass  # already gone


class Verdict:
    """Collects a suite's failures and notes; decides PASS or FAIL once, at the end."""

    def __init__(self, suite: str) -> None:
        self.suite = suite
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.finished = False
        self.line = ""

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def _grouped(self) -> list[str]:
        counts: dict[str, int] = {}
        for message in self.failures:
            counts[message] = counts.get(message, 0) + 1
        return [message if n == 1 else f"{message} (x{n})" for message, n in counts.items()]

    def note(self, message: str) -> None:
        self.notes.append(message)

    def decide(self) -> int:
        load = os.getloadavg()[0]
        cpus = os.cpu_count() or 1
        if load > cpus:
            self.note(
                f"load average {load:.1f} on {cpus} CPUs: timings were disturbed by other processes "
                "(a descheduled node saves up tokens and sends them on wake-up); rerun on a quiet machine"
            )
        if not self.finished:
            self.failures.insert(0, "the suite did not finish (run time limit reached or stopped early)")
        if self.failures:
            grouped = self._grouped()
            shown = "; ".join(grouped[:8])
            more = f" (+{len(grouped) - 8} more)" if len(grouped) > 8 else ""
            self.line = f"FAIL: {self.suite}: {shown}{more}"
            return 1
        self.line = f"PASS: {self.suite}"
        return 0

    def install(self) -> None:
        """Hook the verdict into locust: exit code on quitting, the verdict as the very last line."""

        @events.quitting.add_listener
        def _set_exit_code(environment: Environment, **_: Any) -> None:
            environment.process_exit_code = self.decide()

        @events.quit.add_listener
        def _print_verdict(exit_code: int, **_: Any) -> None:
            for note in self.notes:
                print(f"note: {note}")
            print(self.line, flush=True)


def report(environment: Environment, name: str, started: float, *, length: int = 0, error: str | None = None) -> None:
    """One sample in locust's statistics (response time = now - started, in ms)."""
    environment.events.request.fire(
        request_type="WS",
        name=name,
        response_time=(time.time() - started) * 1000,
        response_length=length,
        exception=Exception(error) if error else None,
        context={},
    )


def jwt_secret(environment: Environment) -> str:
    return str(getattr(environment.parsed_options, "jwt_secret", "") or os.environ.get(DEFAULT_JWT_SECRET_ENV, ""))


def token_for(environment: Environment, user: str, ttl: int = 3600) -> str:
    from cluster.auth import issue_token

    return issue_token(jwt_secret(environment), user, ttl_seconds=ttl)


def percentiles(values: list[float], qs: tuple[float, ...] = (0.5, 0.95, 0.99, 1.0)) -> list[float]:
    if not values:
        return [float("nan")] * len(qs)
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] for q in qs]


def stop_soon(environment: Environment) -> None:
    """End the run (from a user greenlet): locust then fires quitting and exits."""
    import gevent

    runner = environment.runner
    if runner is not None:
        gevent.spawn_later(0.1, runner.quit)
