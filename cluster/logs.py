"""JSON-lines logging (SPEC §9): one object per line, never a token.

Lifecycle events (connect, disconnect, subscribe, unsubscribe, publish failure,
auth failure) are logged with node, connection, user and reason. Nothing on the
per-event hot path logs; bad messages from the bus are logged at a bounded rate.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

LOGGER = logging.getLogger("delta_push")


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False


def log(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one lifecycle event with its fields (node, connection, user, reason…)."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, event, extra={"fields": {k: v for k, v in fields.items() if v is not None}})


class RateLimitedLog:
    """Logs at most ``per_second`` lines a second; counts and reports what it skipped."""

    def __init__(self, per_second: float = 10.0) -> None:
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._skipped = 0

    def __call__(self, event: str, level: int = logging.WARNING, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self._interval
        if self._skipped:
            fields["skipped"] = self._skipped
            self._skipped = 0
        log(event, level, **fields)
