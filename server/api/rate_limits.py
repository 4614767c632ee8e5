"""Per-key rates: requests a minute and tokens a minute, each a token bucket refilled
continuously with a minute's burst. The arithmetic is pure (time is an argument), so it is
tested without waiting.

Rule: a request is admitted when its key has a request to spend and its token bucket is
not in debt; its prompt and completion tokens are charged when it ends (they are not known
before), so one long answer can put the key in debt, and the next request waits for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from models.errors import RateLimitedError
from server.auth.keys import KeySpec


@dataclass
class TokenBucket:
    per_minute: int
    tokens: float
    updated_at: float

    def take(self, now: float) -> float:
        """Spend one now: 0 when granted, else the seconds until one is there."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * 60 / self.per_minute

    def charge(self, now: float, amount: float) -> None:
        """Spend `amount` whatever is left: the bucket may go into debt."""
        self._refill(now)
        self.tokens -= amount

    def seconds_in_debt(self, now: float) -> float:
        """0 unless the bucket is in debt; else the seconds until it is out of it."""
        self._refill(now)
        return max(0.0, -self.tokens * 60 / self.per_minute)

    def _refill(self, now: float) -> None:
        self.tokens = min(self.per_minute, self.tokens + (now - self.updated_at) * self.per_minute / 60)
        self.updated_at = now


class RateLimits:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def admit(self, key: KeySpec | None) -> None:
        """Raises 429 with Retry-After when the key is over either rate."""
        if key is None:
            return
        now = self._clock()
        if key.tokens_per_minute is not None:
            if wait_s := _bucket(self._tokens, key.name, key.tokens_per_minute, now).seconds_in_debt(now):
                raise _limited(key.name, key.tokens_per_minute, "tokens", wait_s)
        if key.requests_per_minute is not None:
            if wait_s := _bucket(self._requests, key.name, key.requests_per_minute, now).take(now):
                raise _limited(key.name, key.requests_per_minute, "requests", wait_s)

    def charge_tokens(self, key: KeySpec | None, num_tokens: int) -> None:
        if key is not None and key.tokens_per_minute is not None:
            now = self._clock()
            _bucket(self._tokens, key.name, key.tokens_per_minute, now).charge(now, num_tokens)


def _bucket(buckets: dict[str, TokenBucket], name: str, per_minute: int, now: float) -> TokenBucket:
    return buckets.setdefault(name, TokenBucket(per_minute, per_minute, now))


def _limited(name: str, limit: int, what: str, wait_s: float) -> RateLimitedError:
    retry_after_s = math.ceil(wait_s)
    return RateLimitedError(f"The key {name!r} is limited to {limit} {what} a minute; retry in {retry_after_s} s.", retry_after_s=retry_after_s)
