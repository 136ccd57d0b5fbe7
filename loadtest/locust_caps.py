"""Locust suite: per-user connection cap (cluster-wide) and the subscription cap (SPEC §6).

    .venv/bin/python -m loadtest.run caps        # starts Redis + two nodes itself

or against running nodes (one URL per node; connections are spread over them):

    .venv/bin/locust -f loadtest/locust_caps.py --headless -u 4 -r 4 -t 90s \\
        --host ws://127.0.0.1:8081/ws --targets ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws \\
        --jwt-secret "$PUSH_JWT_SECRET"

Each locust user is one platform user with its own JWT. It opens 6 connections
at once, round-robin over the targets, and PASS needs, for every user:

- exactly 5 welcomed, and the 6th refused with error ``TOO_MANY_CONNECTIONS``
  then close code 4029 — whichever nodes they landed on;
- the 5 still open afterwards (each answers a ping);
- 50 subscriptions accepted on one connection and the 51st refused with
  ``SUBSCRIPTION_LIMIT`` naming that channel;
- after one of the 5 closes, a new connection is welcomed (the slot is released).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import gevent
from locust import User, events, task
from locust.exception import StopUser

from cluster import protocol
from loadtest.locust_common import Closed, PushSocket, Verdict, report, stop_soon, token_for

VERDICT = Verdict("connection and subscription caps")
VERDICT.install()
RUN_ID = uuid.uuid4().hex[:8]
RELEASE_TIMEOUT = 10.0


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("delta-push caps")
    group.add_argument("--redis-url", default="", help="unused here")
    group.add_argument("--jwt-secret", default="", help="HS256 secret of the cluster (default: $PUSH_JWT_SECRET)")
    group.add_argument("--targets", default="", help="comma list of node WebSocket URLs (default: --host)")
    group.add_argument("--caps-connections", type=int, default=5, help="connections per user (SPEC: 5)")
    group.add_argument("--caps-subscriptions", type=int, default=50, help="subscriptions per connection (SPEC: 50)")


class Run:
    users = 0
    finished = 0
    passed = 0


class CapsUser(User):
    def on_start(self) -> None:
        Run.users += 1
        self.index = Run.users
        self.user_id = f"caps-{RUN_ID}-{self.index}"
        options = self.environment.parsed_options
        self.targets = [t for t in (options.targets or self.host).split(",") if t]
        self.token = token_for(self.environment, self.user_id)

    @task
    def scenario(self) -> None:
        failures_before = len(VERDICT.failures)
        opened: list[PushSocket] = []
        try:
            self.check_caps(opened)
        except (Closed, OSError) as exc:
            VERDICT.fail(f"user {self.index}: unexpected close or socket error: {exc}")
        finally:
            for conn in opened:
                conn.close()
        if len(VERDICT.failures) == failures_before:
            Run.passed += 1
        Run.finished += 1
        if Run.finished >= self.environment.runner.target_user_count:
            VERDICT.finished = True
            VERDICT.note(f"{Run.passed} of {Run.finished} users passed over {len(self.targets)} node(s)")
            stop_soon(self.environment)
        raise StopUser()

    def connect(self, slot: int) -> tuple[str, PushSocket | None, dict[str, Any] | None, int | None]:
        """One connection attempt: (outcome, socket if welcomed, first message, close code)."""
        started = time.time()
        url = self.targets[slot % len(self.targets)]
        conn = PushSocket(url, self.token)
        first = conn.recv(10)
        if first is not None and first.get("action") == "welcome":
            report(self.environment, "connect (welcomed)", started)
            return "welcome", conn, first, None
        code = None
        try:
            conn.recv(5)
            conn.recv(5)
        except Closed as exc:
            code = exc.code
        conn.close()
        report(self.environment, "connect (refused)", started)
        return "refused", None, first, code

    def check_caps(self, opened: list[PushSocket]) -> None:
        options = self.environment.parsed_options
        cap = options.caps_connections
        attempts = [gevent.spawn(self.connect, slot) for slot in range(cap + 1)]
        gevent.joinall(attempts, timeout=30)
        outcomes = [a.value for a in attempts if a.successful()]
        if len(outcomes) != cap + 1:
            VERDICT.fail(f"user {self.index}: {cap + 1 - len(outcomes)} connection attempts did not finish")
        welcomed = [o for o in outcomes if o[0] == "welcome"]
        refused = [o for o in outcomes if o[0] == "refused"]
        opened.extend(conn for _, conn, _, _ in welcomed if conn is not None)
        if len(welcomed) != cap:
            VERDICT.fail(
                f"user {self.index}: {len(welcomed)} of {cap + 1} simultaneous connections welcomed, not {cap}"
            )
        for _, _, first, code in refused:
            error_code = (first or {}).get("code")
            if error_code != "TOO_MANY_CONNECTIONS" or code != 4029:
                VERDICT.fail(
                    f"user {self.index}: refused connection got {error_code} / close {code}, not TOO_MANY_CONNECTIONS / 4029"
                )
        nodes = {(first or {}).get("node") for _, _, first, _ in welcomed}
        if len(self.targets) > 1 and len(nodes) < 2:
            VERDICT.fail(f"user {self.index}: the welcomed connections did not span several nodes ({nodes})")

        for position, conn in enumerate(opened):
            conn.send(protocol.ping_request(f"p{position}"))
            if conn.recv_action("pong", 5) is None:
                VERDICT.fail(f"user {self.index}: welcomed connection {position} did not stay open")
        if not opened:
            return
        self.check_subscriptions(opened[0])

        # A released slot is free again: close one and connect once more.
        opened.pop().close()
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while True:
            _, conn, _, code = self.connect(cap)
            if conn is not None:
                opened.append(conn)
                break
            if time.monotonic() > deadline:
                VERDICT.fail(f"user {self.index}: after closing one connection a new one is still refused ({code})")
                break
            gevent.sleep(0.25)

    def check_subscriptions(self, conn: PushSocket) -> None:
        limit = self.environment.parsed_options.caps_subscriptions
        channels = [f"market.ticker:CAPS{i}" for i in range(limit + 1)]
        started = time.time()
        conn.send(protocol.subscribe_request(channels[:limit], "first"))
        ack = conn.recv_action("ack", 10)
        if ack is None or len(ack.get("subscribed", [])) != limit:
            VERDICT.fail(f"user {self.index}: {limit} subscriptions were not all acknowledged: {str(ack)[:200]}")
            return
        report(self.environment, f"subscribe {limit}", started)
        started = time.time()
        conn.send(protocol.subscribe_request([channels[limit]], "over"))
        reply = conn.recv(10)
        while reply is not None and reply.get("action") not in ("error", "ack"):
            reply = conn.recv(10)
        if reply is None or reply.get("code") != "SUBSCRIPTION_LIMIT" or reply.get("channels") != [channels[limit]]:
            VERDICT.fail(f"user {self.index}: subscription {limit + 1} got {str(reply)[:200]}, not SUBSCRIPTION_LIMIT")
            report(self.environment, f"subscribe #{limit + 1} (refused)", started, error="not refused")
            return
        report(self.environment, f"subscribe #{limit + 1} (refused)", started)
