"""Per-key request rates: a token bucket per key, refilled continuously. The arithmetic is
pure (time is an argument), so it is tested without waiting."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from models.errors import RateLimitedError
from server.keys import KeySpec


@dataclass
class TokenBucket:
    per_minute: int
    tokens: float
    updated_at: float

    def take(self, now: float) -> float:
        """Take one request's token: 0 when granted, else the seconds until one is there."""
        self.tokens = min(self.per_minute, self.tokens + (now - self.updated_at) * self.per_minute / 60)
        self.updated_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * 60 / self.per_minute


class RateLimits:
    """One bucket per key that has a `requests_per_minute`; a burst of a minute's worth."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: KeySpec | None) -> None:
        if key is None or key.requests_per_minute is None:
            return
        now = self._clock()
        bucket = self._buckets.setdefault(key.name, TokenBucket(key.requests_per_minute, key.requests_per_minute, now))
        if wait_s := bucket.take(now):
            raise RateLimitedError(
                f"The key {key.name!r} is limited to {key.requests_per_minute} requests a minute; retry in {math.ceil(wait_s)} s.",
                retry_after_s=math.ceil(wait_s),
            )
