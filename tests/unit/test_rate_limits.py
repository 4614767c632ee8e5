"""Per-key rates, on a clock the test moves."""

import pytest

from models.errors import RateLimitedError
from server.api.rate_limits import RateLimits, TokenBucket
from server.auth.keys import key


def test_a_bucket_allows_a_minutes_burst_then_refills_continuously():
    bucket = TokenBucket(per_minute=60, tokens=60, updated_at=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(60))
    assert bucket.take(0.0) == pytest.approx(1.0)  # one a second
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0.0


def test_a_key_over_its_request_rate_gets_429_with_retry_after_and_others_are_untouched():
    now = [0.0]
    limits = RateLimits(clock=lambda: now[0])
    slow, free = key("slow", "s", {"inference"}, requests_per_minute=2), key("free", "f", {"inference"})
    limits.admit(slow)
    limits.admit(slow)
    with pytest.raises(RateLimitedError, match="2 requests a minute") as limited:
        limits.admit(slow)
    assert (limited.value.status_code, limited.value.retry_after_s) == (429, 30)
    for _ in range(100):
        limits.admit(free)
        limits.admit(None)  # no keys configured: no limit
    now[0] = 30.0
    limits.admit(slow)


def test_tokens_are_charged_after_the_fact_and_a_key_in_debt_waits_it_out():
    now = [0.0]
    limits = RateLimits(clock=lambda: now[0])
    metered = key("metered", "m", {"inference"}, tokens_per_minute=600)
    limits.admit(metered)
    limits.charge_tokens(metered, 900)  # one long answer: 300 tokens of debt
    with pytest.raises(RateLimitedError, match="600 tokens a minute") as limited:
        limits.admit(metered)
    assert limited.value.retry_after_s == 30  # 300 tokens at 10 a second
    now[0] = 30.0
    limits.admit(metered)
