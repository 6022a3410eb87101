"""The per-session message rate: a token bucket of `burst` messages, refilled at `rate`
a second. On a node of kernel hosts the same bucket lives in the session's Redis record
and is kept by the script that queues each message (gateway/cluster.py), so it holds
across nodes at no extra round trip; this is its twin for a session in the process."""

from __future__ import annotations

import time


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self) -> bool:
        """One message's token, if there is one (always, with no rate set)."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
