"""Reference counts of the bus subscriptions a node needs, with a linger. Pure: no I/O.

Every connection and every subscription pattern holds the bus names it needs
(:mod:`cluster.bus_routing`); a name is subscribed while anything holds it, and
unsubscribed only after it has been unused for ``linger_seconds``, so that a
client reconnecting or re-subscribing does not make the node UNSUBSCRIBE and
SUBSCRIBE again. The broker turns the changes into Redis commands.
"""

from __future__ import annotations

from typing import Iterable

from cluster.bus_routing import BusName


class InterestCounts:
    """Which bus names are wanted, how often, and which are subscribed (or about to be)."""

    def __init__(self, linger_seconds: float) -> None:
        self.linger_seconds = linger_seconds
        self.wanted: dict[BusName, int] = {}
        self.subscribed: set[BusName] = set()  # sent to Redis, or queued to be
        self.lingering: dict[BusName, float] = {}  # unused but still subscribed: name -> unsubscribe deadline

    def acquire(self, names: Iterable[BusName]) -> list[BusName]:
        """Count one more holder of each name; returns the names that must now be subscribed."""
        new: list[BusName] = []
        wanted = self.wanted
        for name in names:
            count = wanted.get(name, 0)
            wanted[name] = count + 1
            if count:
                continue
            self.lingering.pop(name, None)
            if name not in self.subscribed:
                self.subscribed.add(name)
                new.append(name)
        return new

    def release(self, names: Iterable[BusName], now: float) -> None:
        """Count one holder less; a name nobody holds lingers until ``now + linger_seconds``."""
        wanted = self.wanted
        for name in names:
            count = wanted.get(name, 0)
            if count > 1:
                wanted[name] = count - 1
            elif count == 1:
                del wanted[name]
                self.lingering[name] = now + self.linger_seconds

    def expired(self, now: float) -> list[BusName]:
        """Names whose linger is over: forgotten here, to be unsubscribed."""
        if not self.lingering:
            return []
        done = [name for name, deadline in self.lingering.items() if deadline <= now]
        for name in done:
            del self.lingering[name]
            self.subscribed.discard(name)
        return done

    def reset(self) -> list[BusName]:
        """After a reconnect: the new connection subscribes to every wanted name (lingering ones are dropped)."""
        self.lingering.clear()
        self.subscribed = set(self.wanted)
        return sorted(self.subscribed)
