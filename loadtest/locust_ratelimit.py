"""Locust suite: the push rate limit of 100 events per second per connection (SPEC §6).

    .venv/bin/python -m loadtest.run ratelimit                 # starts Redis + a node itself
    .venv/bin/python -m loadtest.run ratelimit --high-limit    # node at 300 ev/s: must FAIL

or against a running node (``--host`` is the node's WebSocket URL):

    .venv/bin/locust -f loadtest/locust_ratelimit.py --headless -u 11 -r 11 -t 120s \\
        --host ws://127.0.0.1:8081/ws --redis-url redis://127.0.0.1:6379/0

Users subscribe to one channel (``market.trades:RL-<run>``, public, not
conflated); one publisher user then publishes ``--rl-rate`` events/s (400) for
``--rl-seconds`` (5) through the SDK, i.e. ``PUBLISH events:<channel>``. Each
connection reads until every published event is accounted for (received, or
counted in a ``lagged`` notice) or ``--rl-drain-timeout`` passes.

PASS iff, for every connection:

- no sliding 1-second window that starts after the connection's first second
  (counted from its first event) holds more than ``--rl-limit`` (100) events
  plus ``--rl-slack`` (2, for timing jitter between the node's writes and our
  reads). The first second may carry the token bucket's burst (100) on top of
  the rate: up to 200 — that is the documented burst, so it is not held
  against the limit;
- events received + events reported dropped in ``lagged`` = events published,
  with no event received twice.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import gevent
from locust import User, events, task
from locust.exception import StopUser

from cluster import protocol
from loadtest.locust_common import Closed, PushSocket, Verdict, report, stop_soon

VERDICT = Verdict("rate limit")
VERDICT.install()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("delta-push rate limit")
    group.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis of the cluster (to publish)")
    group.add_argument("--jwt-secret", default="", help="unused here: the channel is public")
    group.add_argument("--rl-rate", type=float, default=400.0, help="events published per second")
    group.add_argument("--rl-seconds", type=float, default=5.0, help="seconds of publishing")
    group.add_argument("--rl-limit", type=int, default=100, help="events/s a connection may receive (SPEC: 100)")
    group.add_argument("--rl-burst", type=int, default=100, help="token bucket burst (SPEC: 100)")
    group.add_argument("--rl-slack", type=int, default=2, help="events of timing jitter allowed per window")
    group.add_argument("--rl-drain-timeout", type=float, default=30.0, help="seconds to wait for queued events")


class Run:
    """State shared by the users of one run (one process: locust runs them as greenlets)."""

    channel_key = f"RL-{uuid.uuid4().hex[:8]}"
    limits = ""
    subscribers = 0
    expected_subscribers = 0
    published = 0
    publishing_done = False
    finished_subscribers = 0
    results: list[tuple[int, int, int, int, int]] = []  # per connection: received, lagged, windows, duplicates


def window_max(times: list[float], start_after: float) -> int:
    """The most events in any window [t, t + 1 s) with t >= ``start_after`` (times sorted)."""
    best = 0
    j = 0
    begin = next((i for i, t in enumerate(times) if t >= start_after), len(times))
    for i in range(begin, len(times)):
        j = max(j, i)
        while j < len(times) and times[j] < times[i] + 1.0:
            j += 1
        best = max(best, j - i)
    return best


class Subscriber(User):
    """One connection subscribed to the channel, checking what it receives."""

    weight = 10

    def on_start(self) -> None:
        Run.expected_subscribers = max(Run.expected_subscribers, self.environment.runner.target_user_count - 1)
        self.channel = f"market.trades:{Run.channel_key}"
        started = time.time()
        try:
            self.conn = PushSocket(self.host)
            welcome = self.conn.recv_action("welcome", 10)
            if welcome is None:
                raise Closed(None)
            self.conn.send(protocol.subscribe_request([self.channel], "rl"))
            if self.conn.recv_action("ack", 10) is None:
                raise Closed(None)
        except (Closed, OSError) as exc:
            VERDICT.fail(f"subscriber could not connect and subscribe: {exc}")
            report(self.environment, "connect+subscribe", started, error=str(exc))
            raise StopUser() from None
        report(self.environment, "connect+subscribe", started)
        limits = welcome.get("limits", {})
        Run.limits = f"{limits.get('eventsPerSecond')}/s, burst {limits.get('eventsBurst')}"
        Run.subscribers += 1

    @task
    def receive(self) -> None:
        options = self.environment.parsed_options
        times: list[float] = []
        seqs: set[int] = set()
        duplicates = 0
        dropped = 0
        deadline: float | None = None
        try:
            # Bounded: the whole run is bounded by locust's -t; after publishing, by the drain timeout.
            while True:
                if Run.publishing_done:
                    if deadline is None:
                        deadline = time.monotonic() + options.rl_drain_timeout
                    if len(seqs) + dropped >= Run.published or time.monotonic() > deadline:
                        break
                doc = self.conn.recv(0.5)
                if doc is None:
                    continue
                action = doc.get("action")
                if action == "event":
                    now = time.monotonic()
                    times.append(now)
                    data = doc["data"]
                    seq = data["payload"]["seq"]
                    if seq in seqs:
                        duplicates += 1
                    seqs.add(seq)
                    self.environment.events.request.fire(
                        request_type="WS",
                        name="event",
                        response_time=max(0.0, time.time() * 1000 - data["timestamp"]),
                        response_length=0,
                        exception=None,
                        context={},
                    )
                elif action == "lagged":
                    dropped += int(doc["dropped"])
                elif action == "error":
                    VERDICT.fail(f"server error: {doc.get('code')} {doc.get('message')}")
        except Closed as exc:
            VERDICT.fail(f"connection closed while receiving: {exc}")
        finally:
            self.conn.close()
        self.check(times, len(seqs), dropped, duplicates)
        Run.finished_subscribers += 1
        raise StopUser()

    def check(self, times: list[float], received: int, dropped: int, duplicates: int) -> None:
        if not times:
            VERDICT.fail("a connection received no event")
            return
        Run.results.append(
            (received, dropped, window_max(times, times[0] + 1.0), window_max(times, times[0]), duplicates)
        )


class Publisher(User):
    """Publishes well over the limit once every subscriber is subscribed, then ends the run."""

    fixed_count = 1

    @task
    def publish(self) -> None:
        from cluster.events import SyncEventPublisher

        options = self.environment.parsed_options
        waited = 0.0
        while Run.subscribers < max(1, Run.expected_subscribers) and waited < 30:
            gevent.sleep(0.1)
            waited += 0.1
        if Run.subscribers == 0:
            VERDICT.fail("no subscriber connected")
            self.finish()
        publisher = SyncEventPublisher(options.redis_url, "market-data-collector")
        total = int(options.rl_rate * options.rl_seconds)
        start = time.monotonic()
        try:
            for seq in range(total):
                delay = start + seq / options.rl_rate - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
                started = time.time()
                publisher.publish("market.trades", {"seq": seq}, key=Run.channel_key)
                Run.published += 1
                if seq % 50 == 0:
                    report(self.environment, "publish", started)
        finally:
            publisher.close()
            Run.publishing_done = True
        elapsed = time.monotonic() - start
        VERDICT.note(f"published {Run.published} events in {elapsed:.1f} s to {Run.subscribers} connections")
        waited = 0.0
        while Run.finished_subscribers < Run.subscribers and waited < options.rl_drain_timeout + 10:
            gevent.sleep(0.2)
            waited += 0.2
        self.finish()

    def finish(self) -> None:
        VERDICT.finished = Run.finished_subscribers >= Run.subscribers > 0
        if Run.results:
            judge(self.environment.parsed_options)
        stop_soon(self.environment)
        raise StopUser()


def judge(options: Any) -> None:
    """The verdict over every connection's (received, lagged, max windows, duplicates)."""
    received, dropped, after_first, any_window, duplicates = (list(c) for c in zip(*Run.results, strict=True))
    count = len(Run.results)
    allowed = options.rl_limit + options.rl_slack
    allowed_first = options.rl_limit + options.rl_burst + options.rl_slack

    def over(values: list[int], limit: int) -> int:
        return sum(1 for v in values if v > limit)

    if over(after_first, allowed):
        VERDICT.fail(
            f"{over(after_first, allowed)} of {count} connections received more than {allowed} events in a "
            f"1-second window after their first second (worst {max(after_first)})"
        )
    if over(any_window, allowed_first):
        VERDICT.fail(
            f"{over(any_window, allowed_first)} of {count} connections received more than limit + burst "
            f"({allowed_first}) in one second (worst {max(any_window)})"
        )
    unaccounted = sum(1 for r, d in zip(received, dropped, strict=True) if r + d != Run.published)
    if unaccounted:
        VERDICT.fail(f"{unaccounted} of {count} connections: received + reported lagged != {Run.published} published")
    if any(duplicates):
        VERDICT.fail(f"{over(duplicates, 0)} of {count} connections received an event twice")
    VERDICT.note(
        f"{count} connections (server limits {Run.limits or 'unknown'}): received {min(received)}..{max(received)}, "
        f"reported lagged {min(dropped)}..{max(dropped)} of {Run.published} published; most events in a 1-second "
        f"window after the first second: {max(after_first)} (allowed {options.rl_limit} + {options.rl_slack}); "
        f"in any second: {max(any_window)} (allowed {options.rl_limit} + burst {options.rl_burst} + {options.rl_slack})"
    )
