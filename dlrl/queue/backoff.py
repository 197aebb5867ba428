"""Exponential back-off bounded by a deadline: how queue clients wait for capacity or for Redis.

Polling with a fixed short period would hammer a server that is restarting; a fixed long one
would add latency when the wait is short. Doubling from a few milliseconds up to a cap gives
both, and a deadline bounds the total.
"""

from __future__ import annotations

import time


class Backoff:
    def __init__(self, timeout: float | None, first: float = 0.01, cap: float = 0.5) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delay, self.cap = first, cap

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def sleep(self) -> None:
        """Sleep the current delay (never past the deadline), then double it up to the cap."""
        left = self.remaining()
        time.sleep(self.delay if left is None else min(self.delay, left))
        self.delay = min(self.delay * 2, self.cap)
