"""Logging at a bounded rate, for lines that hostile input can cause."""

from __future__ import annotations

import logging
import time
from typing import Any


class RateLimitedLog:
    """At most `burst` lines, refilled at `per_minute`; what is held back is counted and
    said with the next line that gets through."""

    def __init__(self, logger: logging.Logger, burst: int = 10, per_minute: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.rate = per_minute / 60.0
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            self.suppressed += 1
            return
        self._tokens -= 1
        if self.suppressed:
            msg += " (%d similar lines held back)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.warning(msg, *args)
