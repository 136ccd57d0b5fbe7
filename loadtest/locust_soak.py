"""Locust suite: a bounded mixed soak through the router — tickers to many, private events per user.

    .venv/bin/python -m loadtest.run soak                      # own Redis + node (+ router if present)
    .venv/bin/python -m loadtest.run soak --target ws://127.0.0.1:8080/ws --redis-url redis://127.0.0.1:6379/0

or straight with locust (``--host`` defaults to the router, ws://127.0.0.1:8080/ws;
a node's ``/ws`` works too):

    .venv/bin/locust -f loadtest/locust_soak.py --headless -u 51 -r 51 -t 150s \\
        --redis-url redis://127.0.0.1:6379/0 --jwt-secret "$PUSH_JWT_SECRET" --soak-seconds 60

Every user but one is a platform user with its own JWT, subscribed to
``market.ticker``, ``order.*`` and ``risk.*``; it refreshes its token
(``{"action":"auth"}``) every ``--soak-refresh-seconds`` and reconnects every
``--soak-reconnect-seconds`` (both with jitter). One publisher user publishes
``--soak-ticker-rate`` tickers/s over ``--soak-symbols`` symbols and
``--soak-private-rate`` private ``order.filled`` / ``risk.alert`` events/s to
random connected users, through the SDK, for ``--soak-seconds``; then the run ends.

Reports delivered/s, latency percentiles (envelope ``timestamp`` → receipt, in
ms; not for a ticker's latest value sent on subscribe, marked ``"snapshot":true``,
whose timestamp is when it was published) and errors. PASS iff no server error, no unexpected close, every token
refresh acknowledged, no user ever sees another user's private event, at least
``--soak-min-private`` (0.98) of the private events published to connected users
arrive, and p99 latency ≤ ``--soak-max-p99-ms`` (1000).
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import gevent
from locust import User, events, task
from locust.exception import StopUser

from cluster import protocol
from loadtest.locust_common import Closed, PushSocket, Verdict, percentiles, report, stop_soon, token_for

VERDICT = Verdict("soak")
VERDICT.install()
RUN_ID = uuid.uuid4().hex[:8]
CHANNELS = ["market.ticker", "order.*", "risk.*"]
PRIVATE_TYPES = (("order.filled", "order-executor"), ("risk.alert", "risk-manager"))


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("delta-push soak")
    group.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis of the cluster (to publish)")
    group.add_argument("--jwt-secret", default="", help="HS256 secret of the cluster (default: $PUSH_JWT_SECRET)")
    group.add_argument("--soak-seconds", type=float, default=60.0, help="seconds of load")
    group.add_argument("--soak-symbols", type=int, default=20, help="ticker symbols")
    group.add_argument("--soak-ticker-rate", type=float, default=50.0, help="tickers published per second (total)")
    group.add_argument("--soak-private-rate", type=float, default=20.0, help="private events per second (total)")
    group.add_argument("--soak-refresh-seconds", type=float, default=15.0, help="token refresh period per user")
    group.add_argument("--soak-reconnect-seconds", type=float, default=25.0, help="reconnect period per user")
    group.add_argument("--soak-token-ttl", type=int, default=120, help="token lifetime in seconds")
    group.add_argument("--soak-max-p99-ms", type=float, default=1000.0, help="PASS needs p99 latency at most this")
    group.add_argument("--soak-min-private", type=float, default=0.98, help="PASS needs this share of private events")


class Run:
    started = 0.0
    stop_at = 0.0
    users = 0
    finished = 0
    online: set[str] = set()
    private_sent: dict[str, int] = {}
    private_received: dict[str, int] = {}
    latencies_ms: list[float] = []
    delivered = 0
    snapshots = 0  # latest values sent on subscribe (counted in delivered, not in latency)
    lagged = 0
    refreshes = 0
    reconnects = 0
    publisher_done = False


class SoakUser(User):
    host = "ws://127.0.0.1:8080/ws"
    weight = 50

    def on_start(self) -> None:
        Run.users += 1
        self.user_id = f"soak-{RUN_ID}-{Run.users}"
        self.options = self.environment.parsed_options

    @task
    def soak(self) -> None:
        while Run.stop_at == 0.0:  # the publisher sets the clock when it starts
            gevent.sleep(0.1)
        try:
            while time.time() < Run.stop_at:
                self.session()
        finally:
            Run.finished += 1
        raise StopUser()

    def session(self) -> None:
        """One connection: subscribe, receive, refresh; ends at the reconnect time or the end of the run."""
        options = self.options
        started = time.time()
        try:
            conn = PushSocket(self.host, token_for(self.environment, self.user_id, options.soak_token_ttl))
            welcome = conn.recv_action("welcome", 10)
            if welcome is None:
                raise Closed(None)
            conn.send(protocol.subscribe_request(CHANNELS, "soak"))
            if conn.recv_action("ack", 10) is None:
                raise Closed(None)
        except (Closed, OSError) as exc:
            VERDICT.fail(f"connect+subscribe failed: {exc}")
            report(self.environment, "connect+subscribe", started, error=str(exc))
            gevent.sleep(1.0)
            return
        report(self.environment, "connect+subscribe", started)
        Run.online.add(self.user_id)
        now = time.time()
        reconnect_at = min(Run.stop_at, now + options.soak_reconnect_seconds * random.uniform(0.6, 1.4))
        refresh_at = now + options.soak_refresh_seconds * random.uniform(0.6, 1.4)
        refresh_sent = 0.0
        try:
            while time.time() < reconnect_at:
                if refresh_sent == 0.0 and time.time() >= refresh_at:
                    conn.send(
                        protocol.auth_request(
                            token_for(self.environment, self.user_id, options.soak_token_ttl), "refresh"
                        )
                    )
                    refresh_sent = time.time()
                if refresh_sent and time.time() - refresh_sent > 5:
                    VERDICT.fail("a token refresh was not acknowledged within 5 s")
                    report(self.environment, "auth refresh", refresh_sent, error="no reply")
                    refresh_sent, refresh_at = 0.0, time.time() + options.soak_refresh_seconds
                doc = conn.recv(0.5)
                if doc is None:
                    continue
                action = doc.get("action")
                if action == "event":
                    self.on_event(doc)
                elif action == "authenticated":
                    report(self.environment, "auth refresh", refresh_sent)
                    Run.refreshes += 1
                    refresh_sent, refresh_at = (
                        0.0,
                        time.time() + options.soak_refresh_seconds * random.uniform(0.6, 1.4),
                    )
                elif action == "lagged":
                    Run.lagged += int(doc.get("dropped", 0))
                elif action == "reconnect":
                    break  # the cluster moves us (scale-out or drain): go back through the router
                elif action == "error":
                    VERDICT.fail(f"server error {doc.get('code')}: {doc.get('message')}")
                    report(self.environment, f"error {doc.get('code')}", time.time(), error=str(doc.get("message")))
        except Closed as exc:
            if exc.code != 1012:
                VERDICT.fail(f"unexpected close {exc.code}")
                report(self.environment, "unexpected close", time.time(), error=str(exc.code))
        finally:
            Run.online.discard(self.user_id)
            conn.close()
        Run.reconnects += 1

    def on_event(self, doc: dict[str, Any]) -> None:
        data = doc["data"]
        Run.delivered += 1
        if doc.get("snapshot") is True:
            Run.snapshots += 1  # a ticker's latest value on subscribe: its age is not a delivery latency
            return
        latency = max(0.0, time.time() * 1000 - data["timestamp"])
        Run.latencies_ms.append(latency)
        owner = data.get("userId")
        if owner is not None:
            if owner != self.user_id:
                VERDICT.fail(f"{self.user_id} received a private event of {owner}")
            Run.private_received[owner] = Run.private_received.get(owner, 0) + 1
        self.environment.events.request.fire(
            request_type="WS", name=data["type"], response_time=latency, response_length=0, exception=None, context={}
        )


class Publisher(User):
    host = "ws://127.0.0.1:8080/ws"
    fixed_count = 1

    @task
    def publish(self) -> None:
        from cluster.events import SyncEventPublisher

        options = self.environment.parsed_options
        tickers = SyncEventPublisher(options.redis_url, "market-data-collector")
        private = {source: SyncEventPublisher(options.redis_url, source) for _, source in PRIVATE_TYPES}
        gevent.sleep(2.0)  # let the users connect first
        Run.started = time.time()
        Run.stop_at = Run.started + options.soak_seconds
        ticker_every = 1.0 / options.soak_ticker_rate if options.soak_ticker_rate > 0 else None
        private_every = 1.0 / options.soak_private_rate if options.soak_private_rate > 0 else None
        next_ticker = next_private = Run.started
        seq = 0
        try:
            while time.time() < Run.stop_at:
                now = time.time()
                if ticker_every and now >= next_ticker:
                    symbol = f"SYM{seq % options.soak_symbols}"
                    tickers.publish("market.ticker", {"symbol": symbol, "price": 100 + seq % 7, "seq": seq}, key=symbol)
                    seq += 1
                    next_ticker += ticker_every
                if private_every and now >= next_private and Run.online:
                    user = random.choice(sorted(Run.online))
                    event_type, source = random.choice(PRIVATE_TYPES)
                    private[source].publish(event_type, {"seq": seq}, user_id=user, priority="p1")
                    Run.private_sent[user] = Run.private_sent.get(user, 0) + 1
                    next_private += private_every
                elif private_every and now >= next_private:
                    next_private += private_every
                gevent.sleep(max(0.0, min(next_ticker, next_private) - time.time()))
        finally:
            tickers.close()
            for publisher in private.values():
                publisher.close()
            Run.publisher_done = True
        waited = 0.0
        while Run.finished < Run.users and waited < 30:
            gevent.sleep(0.2)
            waited += 0.2
        judge(options, time.time() - Run.started)
        VERDICT.finished = Run.finished >= Run.users > 0
        stop_soon(self.environment)
        raise StopUser()


def judge(options: Any, elapsed: float) -> None:
    sent = sum(Run.private_sent.values())
    received = sum(min(Run.private_received.get(u, 0), n) for u, n in Run.private_sent.items())
    share = received / sent if sent else 1.0
    p50, p95, p99, worst = percentiles(Run.latencies_ms)
    VERDICT.note(
        f"{Run.users} users, {elapsed:.0f} s: delivered {Run.delivered} events ({Run.delivered / elapsed:,.0f}/s, "
        f"{Run.snapshots} of them latest values on subscribe), "
        f"latency ms p50 {p50:.1f} p95 {p95:.1f} p99 {p99:.1f} max {worst:.1f}; private {received}/{sent} "
        f"({share:.2%}); {Run.refreshes} token refreshes, {Run.reconnects} reconnects, {Run.lagged} reported lagged, "
        f"{len(VERDICT.failures)} errors"
    )
    if Run.delivered == 0:
        VERDICT.fail("no event was delivered")
    if share < options.soak_min_private:
        VERDICT.fail(
            f"only {share:.2%} of private events to connected users arrived (< {options.soak_min_private:.0%})"
        )
    if p99 > options.soak_max_p99_ms:
        VERDICT.fail(f"p99 latency {p99:.0f} ms > {options.soak_max_p99_ms:g} ms")
    if Run.refreshes == 0 and options.soak_seconds > options.soak_refresh_seconds * 1.5:
        VERDICT.fail("no token refresh happened")
