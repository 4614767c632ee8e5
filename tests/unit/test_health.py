"""Degradation verdicts alone: a window of outcomes against objectives."""

import pytest

from server.deployments.health import CanaryAnalysis, Outcome, Slo, Window, breaches, canary_verdict


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


HEALTHY = [(False, 0.1, 50.0)] * 20


def _verdict(canary, active=HEALTHY, slo=None, served_s=10.0, **analysis):
    stats = [_window(outcomes).stats(now=100.0) for outcomes in (canary, active)]
    verdict, found = canary_verdict(*stats, CanaryAnalysis(**analysis), slo, served_s)
    return verdict, [b.kind for b in found]


def test_a_canary_worse_than_the_active_version_is_aborted():
    assert _verdict([(True, 0.1, 50.0)] * 5 + HEALTHY) == ("abort", ["error_rate"])
    assert _verdict([(False, 0.5, 50.0)] * 20) == ("abort", ["ttft"])  # 5x the active's TTFT
    assert _verdict([(False, 0.1, 10.0)] * 20) == ("abort", ["tokens_per_s"])


def test_a_canary_as_good_is_promoted_only_after_its_time_and_only_if_asked():
    assert _verdict(HEALTHY, promote_after_s=60, served_s=30) == ("wait", [])
    assert _verdict(HEALTHY, promote_after_s=60, served_s=60) == ("advance", [])
    assert _verdict(HEALTHY, served_s=3600) == ("wait", [])  # no promote_after_s: an operator promotes


def test_no_verdict_without_enough_to_judge_by():
    broken = [(True, None, None)] * 20
    assert _verdict(broken[:5], promote_after_s=1) == ("wait", [])  # too few canary requests
    assert _verdict(broken, active=HEALTHY[:5]) == ("wait", [])  # too few on the active version to compare
    assert _verdict(HEALTHY, active=HEALTHY[:5], promote_after_s=1) == ("wait", [])  # nor promoted blind


def test_the_deployments_own_objectives_win_over_the_comparison():
    slow = [(False, 0.5, 50.0)] * 20
    assert _verdict(slow, slo=Slo(max_ttft_p95_s=1.0)) == ("wait", [])
    assert _verdict(slow, active=HEALTHY[:1], slo=Slo(max_ttft_p95_s=0.2)) == ("abort", ["ttft"])


def test_a_passing_canary_moves_through_its_steps_then_to_promotion():
    analysis = CanaryAnalysis(steps=[25, 50], promote_after_s=60)
    assert [analysis.next_weight(w) for w in (10, 25, 40, 50)] == [25, 50, 50, None]
    assert CanaryAnalysis().next_weight(10) is None


@pytest.mark.parametrize(
    ("steps", "words"),
    [([50, 25], "increasing weights"), ([25, 25], "increasing weights"), ([0, 50], "steps.0\n  Input should be greater than or equal to 1"), ([50, 100], "steps.1\n  Input should be less than or equal to 99")],
)
def test_steps_are_increasing_weights_under_100(steps, words):
    with pytest.raises(ValueError, match=words):
        CanaryAnalysis(steps=steps)
