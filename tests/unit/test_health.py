"""Degradation verdicts alone: a window of outcomes against objectives."""

import pytest

from server.deployments.health import Outcome, Slo, Window, breaches


def _window(outcomes: list[tuple[bool, float | None, float | None]], at: float = 100.0) -> Window:
    window = Window(seconds=60)
    for is_error, ttft, rate in outcomes:
        window.add(Outcome(at, is_error, ttft, rate))
    return window


def test_a_healthy_window_breaches_nothing():
    stats = _window([(False, 0.1, 50.0)] * 20).stats(now=100.0)
    assert breaches(stats, Slo(max_error_rate=0.05, max_ttft_p95_s=0.5, min_tokens_per_s=10)) == []


def test_each_objective_is_named_when_missed():
    stats = _window([(True, 2.0, 3.0)] * 5 + [(False, 2.0, 3.0)] * 15).stats(now=100.0)
    found = breaches(stats, Slo(max_error_rate=0.05, max_ttft_p95_s=0.5, min_tokens_per_s=10))
    assert [(b.kind, b.text) for b in found] == [
        ("error_rate", "error rate 25.0% above 5.0%"),
        ("ttft", "TTFT p95 2.000 s above 0.5 s"),
        ("tokens_per_s", "3.0 tokens/s below 10"),
    ]


def test_too_few_requests_give_no_verdict():
    stats = _window([(True, None, None)] * 9).stats(now=100.0)
    assert breaches(stats, Slo(max_error_rate=0.0)) == []
    assert [b.text for b in breaches(stats, Slo(max_error_rate=0.0, min_requests=5))] == ["error rate 100.0% above 0.0%"]


def test_outcomes_age_out_of_the_window():
    window = _window([(True, None, None)] * 20, at=0.0)
    assert window.stats(now=30.0).num_requests == 20
    assert window.stats(now=61.0).num_requests == 0


@pytest.mark.parametrize(("ttfts", "p95"), [([0.1] * 18 + [9.0] * 2, 9.0), ([0.1] * 100 + [9.0], 0.1)])
def test_p95_is_the_95th_percentile_of_first_tokens(ttfts, p95):
    assert _window([(False, t, None) for t in ttfts]).stats(now=100.0).ttft_p95_s == p95


def test_a_baseline_turns_a_versions_early_traffic_into_objectives():
    from server.deployments.health import Baseline, slo_from_baseline

    rule = Baseline(ttft_factor=2.0, tokens_per_s_factor=0.5, error_rate_margin=0.05, min_requests=5)
    early = _window([(False, 0.2, 40.0)] * 19 + [(True, 0.2, 40.0)]).stats(now=100.0)
    slo = slo_from_baseline(early, rule)
    assert (slo.max_error_rate, slo.max_ttft_p95_s, slo.min_tokens_per_s) == (pytest.approx(0.10), 0.4, 20.0)
    assert slo_from_baseline(_window([(False, 0.2, 40.0)] * 4).stats(now=100.0), rule) is None  # too little to learn from
    later = _window([(False, 0.9, 40.0)] * 20).stats(now=100.0)
    assert [b.kind for b in breaches(later, slo)] == ["ttft"]
