"""The one decision about a draining slot: may it stop now? Pure, so it is tested alone."""

from __future__ import annotations

import enum


class StopDecision(enum.Enum):
    WAIT = "wait"  # requests are in flight and the deadline has not passed
    STOP = "stop"  # nothing in flight: stop (or park) cleanly
    CUT_OFF = "cut_off"  # the deadline passed: end what is left with model_swapped, then stop


def decide_stop(num_in_flight: int, seconds_draining: float, drain_timeout: float) -> StopDecision:
    if num_in_flight < 0:
        raise ValueError("num_in_flight cannot be negative")
    if num_in_flight == 0:
        return StopDecision.STOP
    if seconds_draining >= drain_timeout:
        return StopDecision.CUT_OFF
    return StopDecision.WAIT
