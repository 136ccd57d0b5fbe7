"""The one wall clock of the project: Unix milliseconds, the unit of SPEC §2 timestamps and ttl."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
