from __future__ import annotations

import pytest

from server.deployments.drain import StopDecision, decide_stop


@pytest.mark.parametrize(
    ("in_flight", "elapsed", "expected"),
    [
        (0, 0.0, StopDecision.STOP),
        (0, 99.0, StopDecision.STOP),
        (3, 0.0, StopDecision.WAIT),
        (1, 29.9, StopDecision.WAIT),
        (1, 30.0, StopDecision.CUT_OFF),
        (5, 45.0, StopDecision.CUT_OFF),
    ],
)
def test_drain_decision(in_flight, elapsed, expected):
    assert decide_stop(in_flight, elapsed, drain_timeout=30.0) is expected


def test_drain_decision_refuses_negative_counts():
    with pytest.raises(ValueError):
        decide_stop(-1, 0.0, 30.0)
