"""The event envelope of SPEC §2: parse and validate fast, build for publishers.

Nodes parse every envelope that arrives on the bus exactly once, with orjson, and
keep the raw bytes so that the delivered frame embeds them without re-encoding.
Nodes accept any well-formed envelope (unknown types and sources included, for
forward compatibility); the publisher SDK is stricter and refuses unknown ones.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from cluster.channels import TYPE_RE
from cluster.clock import now_ms

KNOWN_TYPES: frozenset[str] = frozenset(
    [
        "order.created",
        "order.filled",
        "order.cancelled",
        "order.failed",
        "risk.alert",
        "risk.limit_reached",
        "risk.position_warning",
        "ai.insight_generated",
        "ai.analysis_complete",
        "ai.signal_detected",
        "strategy.created",
        "strategy.updated",
        "strategy.activated",
        "strategy.paused",
        "backtest.started",
        "backtest.progress",
        "backtest.completed",
        "backtest.failed",
        "market.ticker",
        "market.orderbook",
        "market.trades",
        "spirit.state_change",
        "spirit.notification",
    ]
)

KNOWN_SERVICES: frozenset[str] = frozenset(
    [
        "order-executor",
        "risk-manager",
        "nlp-processor",
        "signal-analyzer",
        "strategy-service",
        "backtest-engine",
        "market-data-collector",
        "exchange-connector",
    ]
)

PRIORITIES: tuple[str, ...] = ("p0", "p1", "p2", "p3")
PRIORITY_RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}
DEFAULT_PRIORITY = "p2"
VERSION = "1.0"

SOURCE_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
MAX_ID_FIELD = 256  # userId, sessionId, correlationId
MAX_ENVELOPE_BYTES = 64 * 1024  # SPEC §2 and §4 default for envelopes and client frames; settings start from it


class EnvelopeError(ValueError):
    """A message on the bus is not a valid envelope; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Envelope:
    """The fields a node routes on; ``raw`` is the envelope's JSON as received."""

    id: str
    type: str
    source: str
    timestamp: int
    user_id: str | None
    session_id: str | None
    priority: int  # rank: 0 is p0 (highest)
    expires_at: int | None  # ms; timestamp + ttl
    raw: bytes
    seq: int | None = None  # a state channel's sequence number: the envelope's "seq" (cluster/state.py)

    @property
    def domain(self) -> str:
        return self.type.partition(".")[0]


def _optional_str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if type(value) is not str or not value or len(value) > MAX_ID_FIELD:
        raise EnvelopeError("invalid_field", f"{name} must be a non-empty string of at most {MAX_ID_FIELD} characters")
    return value


def _int(value: Any) -> bool:
    return type(value) is int and value >= 0


def validate(doc: Any, raw: bytes) -> Envelope:
    """Check a decoded envelope against SPEC §2 and return its routing fields."""
    if type(doc) is not dict:
        raise EnvelopeError("not_object", "envelope must be a JSON object")
    event_id = doc.get("id")
    if type(event_id) is not str or not UUID_RE.match(event_id):
        raise EnvelopeError("invalid_field", "id must be a UUID string")
    event_type = doc.get("type")
    if type(event_type) is not str or not TYPE_RE.match(event_type):
        raise EnvelopeError("invalid_field", "type must be <domain>.<name>")
    source = doc.get("source")
    if type(source) is not str or len(source) > 64 or not SOURCE_RE.match(source):
        raise EnvelopeError("invalid_field", "source must be a service name")
    timestamp = doc.get("timestamp")
    if not _int(timestamp):
        raise EnvelopeError("invalid_field", "timestamp must be Unix milliseconds")
    if doc.get("version") != VERSION:
        raise EnvelopeError("invalid_field", f'version must be "{VERSION}"')
    if "payload" not in doc:
        raise EnvelopeError("invalid_field", "payload is required")
    priority = doc.get("priority")
    if priority is None:
        rank = PRIORITY_RANK[DEFAULT_PRIORITY]
    elif type(priority) is str and priority in PRIORITY_RANK:
        rank = PRIORITY_RANK[priority]
    else:
        raise EnvelopeError("invalid_field", "priority must be one of p0..p3")
    ttl = doc.get("ttl")
    if ttl is not None and not _int(ttl):
        raise EnvelopeError("invalid_field", "ttl must be a non-negative integer of milliseconds")
    _optional_str(doc, "correlationId")
    return Envelope(
        id=event_id,
        type=event_type,
        source=source,
        timestamp=timestamp,
        user_id=_optional_str(doc, "userId"),
        session_id=_optional_str(doc, "sessionId"),
        priority=rank,
        expires_at=None if ttl is None else timestamp + ttl,
        raw=raw,
        seq=seq if type(seq := doc.get("seq")) is int and seq > 0 else None,
    )


def parse_envelope(raw: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse one envelope from the bus; raise :class:`EnvelopeError` if it is not one."""
    if len(raw) > max_bytes:
        raise EnvelopeError("too_large", f"envelope exceeds {max_bytes} bytes")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EnvelopeError("invalid_json", "envelope is not valid JSON") from None
    return validate(doc, raw)


def build_envelope(
    event_type: str,
    payload: Any,
    *,
    source: str,
    user_id: str | None = None,
    session_id: str | None = None,
    priority: str | None = None,
    ttl: int | None = None,
    correlation_id: str | None = None,
    allow_unknown: bool = False,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> dict[str, Any]:
    """A new envelope for a publisher; refuses unknown types/services unless allowed."""
    if not allow_unknown and event_type not in KNOWN_TYPES:
        raise EnvelopeError(
            "unknown_type", f"unknown event type {event_type!r} (pass allow_unknown=True to publish it anyway)"
        )
    if not allow_unknown and source not in KNOWN_SERVICES:
        raise EnvelopeError(
            "unknown_source", f"unknown service {source!r} (pass allow_unknown=True to publish it anyway)"
        )
    doc: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": event_type,
        "source": source,
        "timestamp": now_ms(),
        "version": VERSION,
        "payload": payload,
    }
    optional = {
        "userId": user_id,
        "sessionId": session_id,
        "priority": priority,
        "ttl": ttl,
        "correlationId": correlation_id,
    }
    doc.update({k: v for k, v in optional.items() if v is not None})
    validate(doc, b"")  # the SDK never publishes what a node would drop
    try:
        size = len(orjson.dumps(doc))
    except orjson.JSONEncodeError as exc:
        raise EnvelopeError("invalid_payload", f"payload is not JSON: {exc}") from None
    if size > max_bytes:
        raise EnvelopeError("too_large", f"envelope is {size} bytes of JSON; nodes drop envelopes over {max_bytes}")
    return doc


def wrap_legacy(message: Any, raw: bytes) -> Envelope:
    """A legacy ``spirit:events`` message as an envelope (SPEC §3).

    A valid envelope keeps its type; any other JSON (an object with ``id`` and
    ``type`` fields that is not a valid envelope included) becomes
    ``spirit.notification`` with the message as payload and source ``spirit``. A legacy object's
    ``userId`` / ``sessionId`` (if strings) make the notification private, as
    the legacy service meant it.
    """
    if type(message) is dict and "id" in message and "type" in message:
        try:
            return validate(message, raw)
        except EnvelopeError:
            pass  # legacy objects often carry their own id/type: not an envelope, so wrapped below
    doc: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": "spirit.notification",
        "source": "spirit",
        "timestamp": now_ms(),
        "version": VERSION,
        "payload": message,
    }
    if type(message) is dict:
        for name in ("userId", "sessionId"):
            value = message.get(name)
            if type(value) is str and 0 < len(value) <= MAX_ID_FIELD:
                doc[name] = value
    return validate(doc, orjson.dumps(doc))
