"""Every setting of every delta-push process, with its default, in one place.

Each setting is read from its environment variable (``PUSH_*`` or ``REDIS_URL``)
and can be overridden by a command-line flag of the same name. The README's
configuration table is checked against :data:`SETTINGS` by a test.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from cluster.envelope import MAX_ENVELOPE_BYTES


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _nodelay_mode(text: str) -> str:
    """PUSH_TCP_NODELAY: ``auto``, or a boolean (read as ``true``/``false``)."""
    value = text.strip().lower()
    return "auto" if value == "auto" else str(_bool(value)).lower()


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _setting(default: Any, env: str, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    return field(default=default, metadata={"env": env, "help": help, "parse": parse})


@dataclass(frozen=True)
class Settings:
    """Configuration shared by nodes, routers, the SDK and the CLI."""

    # --- network -----------------------------------------------------------
    host: str = _setting("0.0.0.0", "PUSH_HOST", "Address to listen on.")
    port: int = _setting(8081, "PUSH_PORT", "Port to listen on (router: 8080 by convention).")
    node_id: str = _setting("", "PUSH_NODE_ID", "Node id shown in welcome.node; default: hostname-port.")
    public_url: str = _setting(
        "", "PUSH_PUBLIC_URL", "WebSocket URL clients use to reach this node; default: ws://127.0.0.1:PORT/ws."
    )
    internal_url: str = _setting(
        "", "PUSH_INTERNAL_URL", "HTTP URL routers use to reach this node; default: http://127.0.0.1:PORT."
    )
    listen_backlog: int = _setting(8192, "PUSH_LISTEN_BACKLOG", "TCP listen backlog; sized for reconnect storms.")
    metrics_port: int = _setting(
        0,
        "PUSH_METRICS_PORT",
        "Serve /metrics on this port only, apart from client traffic; 0 serves it on PUSH_PORT.",
    )
    redis_url: str = _setting(
        "redis://127.0.0.1:6379/0",
        "REDIS_URL",
        "Redis event bus: redis://host:port/db for one server, redis+cluster://host:port[,host:port] for a Redis Cluster (docs/OPERATIONS.md).",
    )
    # --- authentication ------------------------------------------------------
    jwt_secret: str = _setting("", "PUSH_JWT_SECRET", "HS256 secret for client tokens.")
    jwt_public_key: str = _setting(
        "", "PUSH_JWT_PUBLIC_KEY", "PEM public key (or a path to one) for RS256/ES256 tokens."
    )
    jwt_algorithms: tuple[str, ...] = _setting(
        (),
        "PUSH_JWT_ALGORITHMS",
        "Allowed JWT algorithms (comma list); default HS256 with a secret plus RS256,ES256 with a public key.",
        _csv,
    )
    jwt_audience: str = _setting("", "PUSH_JWT_AUDIENCE", "Required `aud` claim, if set.")
    jwt_issuer: str = _setting("", "PUSH_JWT_ISSUER", "Required `iss` claim, if set.")
    jwt_match_cluster: bool = _setting(
        False,
        "PUSH_JWT_MATCH_CLUSTER",
        "Refuse to join a cluster whose live nodes accept other tokens (keys, audience, issuer); off: log "
        "jwt_keys_differ and join. A node without any key never joins nodes that have one.",
        _bool,
    )
    allow_anonymous: bool = _setting(
        True, "PUSH_ALLOW_ANONYMOUS", "Accept connections without a token (public domains only).", _bool
    )
    public_domains: tuple[str, ...] = _setting(
        ("market",), "PUSH_PUBLIC_DOMAINS", "Event domains readable without a token (comma list).", _csv
    )
    allowed_origins: tuple[str, ...] = _setting(
        (), "PUSH_ALLOWED_ORIGINS", "Origin allow-list (comma list); empty allows any origin.", _csv
    )
    # --- limits ----------------------------------------------------------------
    max_connections_per_user: int = _setting(
        5, "PUSH_MAX_CONNECTIONS_PER_USER", "Concurrent connections per user, cluster-wide."
    )
    connection_lease_seconds: int = _setting(
        30, "PUSH_CONNECTION_LEASE_SECONDS", "Lease on a counted connection; a dead node's counts expire after it."
    )
    max_subscriptions: int = _setting(50, "PUSH_MAX_SUBSCRIPTIONS", "Subscriptions per connection.")
    inbound_per_second: float = _setting(
        20.0, "PUSH_INBOUND_PER_SECOND", "Client messages per second per connection before close 1008."
    )
    events_per_second: float = _setting(
        100.0, "PUSH_EVENTS_PER_SECOND", "Events pushed per second per connection (token bucket rate)."
    )
    events_burst: int = _setting(100, "PUSH_EVENTS_BURST", "Token bucket burst for pushed events.")
    queue_size: int = _setting(1000, "PUSH_QUEUE_SIZE", "Events waiting per connection before the drop policy applies.")
    write_buffer_bytes: int = _setting(
        1_048_576,
        "PUSH_WRITE_BUFFER_BYTES",
        "Socket write buffer per connection past which the reader is a slow consumer (close 4008).",
    )
    slow_consumer_seconds: float = _setting(
        10.0, "PUSH_SLOW_CONSUMER_SECONDS", "Seconds a socket may stay undrained while events wait before close 4008."
    )
    lagged_interval: float = _setting(
        0.25, "PUSH_LAGGED_INTERVAL", "Seconds over which drops are coalesced into one lagged notice."
    )
    max_frame_bytes: int = _setting(MAX_ENVELOPE_BYTES, "PUSH_MAX_FRAME_BYTES", "Largest client frame accepted (close 1009 above).")
    max_envelope_bytes: int = _setting(
        MAX_ENVELOPE_BYTES, "PUSH_MAX_ENVELOPE_BYTES", "Largest event envelope accepted from the bus."
    )
    bus_linger_seconds: float = _setting(
        2.0, "PUSH_BUS_LINGER_SECONDS", "Seconds a bus subscription nobody uses any more is kept before UNSUBSCRIBE."
    )
    ws_heartbeat: float = _setting(30.0, "PUSH_WS_HEARTBEAT", "Seconds between WebSocket protocol pings.")
    tcp_nodelay: str = _setting(
        "false",
        "PUSH_TCP_NODELAY",
        "false: the kernel coalesces small event frames while earlier ones are unacknowledged (Nagle, as Nchan; "
        "p0 events and replies go at once): less CPU per delivery to slow readers; true: every frame goes to the "
        "network at once; auto: coalesce only for connections whose reader is behind (see the README).",
        _nodelay_mode,
    )
    # --- cluster ---------------------------------------------------------------
    drain_seconds: float = _setting(
        10.0, "PUSH_DRAIN_SECONDS", "Window over which a stopping node spreads its reconnects."
    )
    heartbeat_seconds: float = _setting(1.0, "PUSH_HEARTBEAT_SECONDS", "Membership heartbeat period.")
    node_ttl_seconds: float = _setting(
        6.0, "PUSH_NODE_TTL_SECONDS", "A node without heartbeat for this long leaves the ring."
    )
    rebalance_per_second: float = _setting(
        0.05, "PUSH_REBALANCE_SHARE_PER_SECOND", "Share of misplaced connections moved per second after a scale-out."
    )
    router_ip_rate: float = _setting(
        100.0, "PUSH_ROUTER_IP_RATE", "New connections per second per client IP at the router."
    )
    router_ip_burst: int = _setting(
        200, "PUSH_ROUTER_IP_BURST", "Burst of new connections per client IP at the router."
    )
    router_trust_forwarded_for: bool = _setting(
        False,
        "PUSH_ROUTER_TRUST_FORWARDED_FOR",
        "Take the client IP from the last X-Forwarded-For entry (only behind a proxy that sets it).",
        _bool,
    )
    web_root: str = _setting(
        "",
        "PUSH_WEB_ROOT",
        "Folder the router serves the live page and browser client from; default: the checkout's web/.",
    )
    # --- recovery --------------------------------------------------------------
    history_size: int = _setting(1000, "PUSH_HISTORY_SIZE", "Events kept per channel for recovery.")
    history_seconds: int = _setting(300, "PUSH_HISTORY_SECONDS", "Seconds events are kept per channel for recovery.")
    # --- state channels -------------------------------------------------------
    state_types: tuple[str, ...] = _setting(
        ("market.ticker", "market.orderbook"),
        "PUSH_STATE_TYPES",
        "Event types whose channels are state channels: a subscribe gets their latest value at once, events carry a per-channel seq (comma list).",
        _csv,
    )
    snapshot_by_default: bool = _setting(
        True,
        "PUSH_SNAPSHOT_BY_DEFAULT",
        "A subscribe without options.snapshot gets state channels' latest values (options.snapshot false turns "
        "it off per subscription; false here: only with options.snapshot true).",
        _bool,
    )
    snapshot_max_channels: int = _setting(
        200,
        "PUSH_SNAPSHOT_MAX_CHANNELS",
        "At most this many channels' latest values for one subscribed pattern; an error SNAPSHOT_LIMIT says how many were left out.",
    )
    state_seconds: int = _setting(
        86400, "PUSH_STATE_SECONDS", "Seconds a state channel's latest value is kept after its last publish."
    )
    # --- operations -------------------------------------------------------------
    log_level: str = _setting("INFO", "PUSH_LOG_LEVEL", "Log level of the JSON-lines log.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment, then explicit overrides (flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None:
                values[f.name] = _parse(f.metadata["parse"], f.type, raw, f.metadata["env"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def effective_node_id(self) -> str:
        return self.node_id or f"{os.uname().nodename}-{self.port}"

    @property
    def effective_public_url(self) -> str:
        return self.public_url or f"ws://127.0.0.1:{self.port}/ws"

    @property
    def effective_internal_url(self) -> str:
        return (self.internal_url or f"http://127.0.0.1:{self.port}").rstrip("/")

    def public_limits(self) -> dict[str, Any]:
        """The limits a client is told about in its welcome message."""
        return {
            "maxConnectionsPerUser": self.max_connections_per_user,
            "maxSubscriptions": self.max_subscriptions,
            "maxInboundPerSecond": self.inbound_per_second,
            "eventsPerSecond": self.events_per_second,
            "eventsBurst": self.events_burst,
            "queueSize": self.queue_size,
            "maxFrameBytes": self.max_frame_bytes,
        }


def _parse(parse: Callable[[str], Any] | None, type_name: Any, raw: str, env: str) -> Any:
    if parse is None:
        parse = {"int": int, "float": float, "str": str}[str(type_name)]
    try:
        return parse(raw)
    except ValueError as exc:
        raise SystemExit(f"invalid value for {env}: {exc}") from None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_flags(
    parser: argparse.ArgumentParser, names: list[str] | None = None, shown: Mapping[str, Any] | None = None
) -> None:
    """Add one flag per setting (all of them, or ``names``) to a CLI parser.

    ``shown`` replaces the default a flag's help states, for a command that
    applies its own (the router listens on 8080, not the node's 8081).
    """
    shown = shown or {}
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        default = shown.get(f.name, f.default)
        parse = f.metadata["parse"] or {"int": int, "float": float, "str": str}[str(f.type)]
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=parse,
            default=None,
            metavar=f.metadata["env"],
            help=f"{f.metadata['help']} (env {f.metadata['env']}, default {_show(default)})",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = {f.name for f in fields(Settings)}
    return Settings.from_env(**{k: v for k, v in vars(args).items() if k in names})


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "(empty)"
    if value == "":
        return "(empty)"
    return str(value)


SETTINGS = [(f.metadata["env"], flag_name(f.name), _show(f.default), f.metadata["help"]) for f in fields(Settings)]
"""(env var, flag, default, meaning) for every setting: the README table's source."""
