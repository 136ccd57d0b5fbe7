"""JSON-lines logging (SPEC §9): one object per line, never a token.

Lifecycle events (connect, disconnect, subscribe, unsubscribe, publish failure,
auth failure) are logged with node, connection, user and reason. Nothing on the
per-event hot path logs; bad messages from the bus are logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from typing import Any, BinaryIO

import orjson

from cluster.limits import TokenBucket

LOGGER = logging.getLogger("delta_push")


class JsonLinesWriter:
    """Writes log lines once per event-loop iteration: a connect storm's lines cost one syscall, not one each."""

    def __init__(self, stream: BinaryIO, level: int) -> None:
        self.stream = stream
        self.level = level
        self._pending: list[bytes] = []  # bounded by what one loop iteration logs
        self._scheduled = False
        atexit.register(self.flush)

    def write(self, line: bytes) -> None:
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr is gone: nothing left to tell


_writer: JsonLinesWriter | None = None


def configure(level: str = "INFO") -> None:
    """Send the process's log to stderr as JSON lines (without this, lines go to Python logging)."""
    global _writer
    _writer = JsonLinesWriter(sys.stderr.buffer, logging.getLevelName(level.upper()))


def log(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one lifecycle event with its fields (node, connection, user, reason...)."""
    writer = _writer
    if writer is None:
        if LOGGER.isEnabledFor(level):
            LOGGER.log(level, event, extra={"fields": {k: v for k, v in fields.items() if v is not None}})
        return
    if level < writer.level:
        return
    doc: dict[str, Any] = {"ts": round(time.time(), 3), "level": logging.getLevelName(level).lower(), "event": event}
    doc.update((k, v) for k, v in fields.items() if v is not None)
    writer.write(orjson.dumps(doc, default=str) + b"\n")


class RateLimitedLog:
    """Logs every line of a short burst, then at most ``per_second``; reports what it skipped.

    Bad input from outside (malformed events, refused connections) is logged once per
    occurrence while it is rare, and cannot flood the log when it is not.
    """

    def __init__(self, per_second: float = 10.0, burst: int = 20) -> None:
        self._bucket = TokenBucket(per_second, burst, time.monotonic())
        self._skipped = 0

    def __call__(self, event: str, level: int = logging.WARNING, **fields: Any) -> None:
        if not self._bucket.take(time.monotonic()):
            self._skipped += 1
            return
        if self._skipped:
            fields["skipped"] = self._skipped
            self._skipped = 0
        log(event, level, **fields)
