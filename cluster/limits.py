"""Rate limiting shared by nodes and routers: a token bucket.

Used for the 100 events/s push limit per connection, per-subscription
``options.limit``, the 20 messages/s inbound limit and the router's per-IP limit
on new connections. Time is passed in so the bucket is pure and testable.

A bucket can also promise "never more than N in any one-second window" (the push
limit's promise to clients): tokens saved up while a starved process was not
running would otherwise go out at once. The window is armed the first time the
bucket runs dry, so connections that never reach their limit carry no window.
"""

from __future__ import annotations

from collections import deque

WINDOW_SECONDS = 1.0


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    With ``window_limit``, also at most that many takes in any ``WINDOW_SECONDS``.
    """

    __slots__ = ("rate", "burst", "tokens", "updated", "window_limit", "window")

    def __init__(self, rate: float, burst: float, now: float, window_limit: int | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now
        self.window_limit = window_limit
        self.window: deque[float] | None = None  # times of the last takes, once armed

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one (refill inlined: this runs once per delivered event)."""
        tokens = self.tokens
        elapsed = now - self.updated
        if elapsed > 0:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self.updated = now
        if tokens < 1.0:
            self.tokens = tokens
            if self.window is None and self.window_limit:
                self.window = deque(maxlen=self.window_limit)
            return False
        window = self.window
        if window is not None:
            if len(window) == self.window_limit and now - window[0] < WINDOW_SECONDS:
                self.tokens = tokens
                return False
            window.append(now)
        self.tokens = tokens - 1.0
        return True

    def wait_time(self, now: float) -> float:
        """Seconds until a take can succeed."""
        self._refill(now)
        wait = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate
        window = self.window
        if window is not None and len(window) == self.window_limit:
            wait = max(wait, window[0] + WINDOW_SECONDS - now)
        return wait
