"""Prometheus metrics of SPEC §9, defined once for every process.

Names and meanings come from the design document; every process exposes the
ones it updates at ``/metrics``. Label values are small fixed sets (reasons),
never user or connection ids.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

WS_CONNECTIONS = Gauge("ws_connections_total", "Open WebSocket connections on this process.")
EVENTS_PUBLISHED = Counter("events_published_total", "Events taken from the bus (node) or published (SDK).")
EVENT_CONSUME_LATENCY = Histogram(
    "event_consume_latency_seconds",
    "Event timestamp to written to the socket.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SUBSCRIPTIONS_ACTIVE = Gauge("subscriptions_active", "Active subscriptions (connection x pattern) on this node.")
EVENTS_DELIVERED = Counter("events_delivered_total", "Event frames written to client sockets.")
EVENTS_DROPPED = Counter("events_dropped_total", "Events not delivered, by reason.", ["reason"])
AUTH_FAILURES = Counter("auth_failures_total", "Refused tokens, by reason.", ["reason"])
CONNECTIONS_REJECTED = Counter(
    "connections_rejected_total", "Connections refused or closed by policy, by reason.", ["reason"]
)
REDIS_RECONNECTS = Counter("redis_reconnects_total", "Times the bus connection was lost and re-established.")
BUS_CONNECTED = Gauge(
    "bus_connected", "1 while this process is subscribed to the Redis bus, 0 while it is reconnecting."
)
PROTOCOL_ERRORS = Counter("protocol_errors_total", "Error messages sent to clients, by code.", ["code"])
COALESCING_CONNECTIONS = Gauge(
    "ws_coalescing_connections",
    "Client connections whose small frames the kernel coalesces (Nagle): all with PUSH_TCP_NODELAY=false, "
    "those whose reader is behind with auto.",
)
BUS_SUBSCRIPTIONS = Gauge("bus_subscriptions", "Redis channels and patterns this node is subscribed to.")
SDK_UNREPLICATED = Counter(
    "sdk_unreplicated_events_total",
    "Events the SDK published on a Redis Cluster that no replica confirmed within the WAIT timeout.",
)
BUS_PLAIN_PRIVATE = Counter(
    "bus_plain_private_events_total",
    "Private events that arrived by plain PUBLISH on events:<channel>: they cost every interested node "
    "(publish them with the SDK to route them to their user's node).",
)


class BusCounts:
    """Bus messages a node took, by route, counted as plain ints: the hot path pays no metric call."""

    __slots__ = ("user", "admin", "events", "legacy", "unwanted")

    def __init__(self) -> None:
        self.user = self.admin = self.events = self.legacy = self.unwanted = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        taken = CounterMetricFamily(
            "bus_messages",
            "Messages taken from the bus, by route (user channel, push:admin, events:, legacy).",
            labels=["route"],
        )
        for route in ("user", "admin", "events", "legacy"):
            taken.add_metric([route], getattr(self, route))
        yield taken
        yield CounterMetricFamily(
            "bus_messages_unwanted",
            "Bus messages dropped before parsing because no local connection could receive them.",
            value=self.unwanted,
        )


BUS_COUNTS = BusCounts()
REGISTRY.register(BUS_COUNTS)  # type: ignore[arg-type]


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


# --- router (SPEC §7) ---------------------------------------------------------------
ROUTER_ROUTES = Counter("router_routes_total", "Connections and route lookups sent to each node.", ["node"])
ROUTER_PROXIED_CONNECTIONS = Gauge(
    "router_proxied_connections", "WebSocket connections the router is relaying, per node.", ["node"]
)
ROUTER_PROXY_ERRORS = Counter(
    "router_proxy_errors_total", "Failures to open or relay a proxied connection, by reason.", ["reason"]
)
ROUTER_NODES = Gauge("router_nodes", "Live nodes in the router's ring.")
ROUTER_REDIS_CONNECTED = Gauge(
    "router_redis_connected", "1 while the router reads the membership from Redis, 0 while it routes on its cached ring."
)
