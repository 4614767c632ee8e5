"""Per-key request rates, on a clock the test moves."""

import pytest

from models.errors import RateLimitedError
from server.api.rate_limits import RateLimits, TokenBucket
from server.keys import key


def test_a_bucket_allows_a_minutes_burst_then_refills_continuously():
    bucket = TokenBucket(per_minute=60, tokens=60, updated_at=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(60))
    assert bucket.take(0.0) == pytest.approx(1.0)  # one a second
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0.0


def test_a_limited_key_gets_429_with_retry_after_and_others_are_untouched():
    now = [0.0]
    limits = RateLimits(clock=lambda: now[0])
    slow, free = key("slow", "s", {"inference"}, requests_per_minute=2), key("free", "f", {"inference"})
    limits.take(slow)
    limits.take(slow)
    with pytest.raises(RateLimitedError) as limited:
        limits.take(slow)
    assert (limited.value.status_code, limited.value.retry_after_s) == (429, 30)
    for _ in range(100):
        limits.take(free)
        limits.take(None)  # no keys configured: no limit
    now[0] = 30.0
    limits.take(slow)
