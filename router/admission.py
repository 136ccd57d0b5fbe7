"""Who may open a connection through the router: client IP and its new-connection rate.

The client IP is the TCP peer. X-Forwarded-For sent by a client is ignored
(anyone can write it) unless ``router_trust_forwarded_for`` says the router
sits behind a proxy that sets it; then the last entry — the address that proxy
saw — is used. Each IP gets a :class:`~cluster.limits.TokenBucket` of
``router_ip_rate`` new connections per second with ``router_ip_burst`` saved up
(SPEC §7: 100/s, burst 200).
"""

from __future__ import annotations

from aiohttp import web

from cluster.limits import TokenBucket
from cluster.settings import Settings

MAX_TRACKED_IPS = 100_000
"""Buckets kept at most (about 10 MB). A full bucket is forgotten first: it is the same as a new one."""


def client_ip(request: web.Request, settings: Settings) -> str:
    """The address the router limits and forwards as X-Forwarded-For."""
    if settings.router_trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        last = forwarded.rpartition(",")[2].strip()
        if last:
            return last
    return request.remote or "unknown"


class ConnectionRateLimiter:
    """New connections per second per client IP, in a bounded table of token buckets."""

    def __init__(self, rate: float, burst: int, max_ips: int = MAX_TRACKED_IPS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_ips = max_ips
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str, now: float) -> bool:
        """Spend one of ``ip``'s tokens; False means over the limit."""
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_ips:
                self._evict(now)
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def _evict(self, now: float) -> None:
        """Forget buckets that have refilled; if that frees too little, the oldest tenth."""
        refill_seconds = self.burst / self.rate if self.rate > 0 else float("inf")
        full = [ip for ip, b in self._buckets.items() if now - b.updated >= refill_seconds]
        for ip in full:
            del self._buckets[ip]
        if len(self._buckets) >= self.max_ips * 0.9:
            for ip in list(self._buckets)[: max(1, self.max_ips // 10)]:
                del self._buckets[ip]
