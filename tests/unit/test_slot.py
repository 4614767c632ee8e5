"""Slot states move only along the transition table; leases and cut-offs are counted."""

import logging
from pathlib import Path

import pytest

from server.deployments.slot import TRANSITIONS, InvalidTransitionError, Slot, SlotState, Target
from tests.fake_engine import FakeBehaviour, FakeEngine


def _slot(version: str = "chat@1") -> Slot:
    return Slot(Target(version, Path("/models/a"), {}, 100), FakeEngine("a", FakeBehaviour()))


def test_a_slot_walks_a_swap_and_every_move_is_logged(caplog):
    slot = _slot()
    with caplog.at_level(logging.INFO, logger="server.deployments.slot"):
        for state in (SlotState.READY, SlotState.DRAINING, SlotState.ASLEEP, SlotState.STANDBY, SlotState.READY, SlotState.STOPPED):
            slot.move_to(state)
    assert "slot chat@1: loading -> ready" in caplog.text and "slot chat@1: ready -> stopped" in caplog.text


@pytest.mark.parametrize(
    ("start", "forbidden"),
    [(SlotState.STOPPED, SlotState.READY), (SlotState.LOADING, SlotState.DRAINING), (SlotState.READY, SlotState.ASLEEP), (SlotState.FAILED, SlotState.READY)],
)
def test_a_move_the_table_forbids_raises(start, forbidden):
    slot = _slot()
    slot.state = start
    with pytest.raises(InvalidTransitionError, match=f"from {start.value} to {forbidden.value}"):
        slot.move_to(forbidden)


def test_every_state_can_be_stopped_except_from_failed_which_stops_too():
    assert all(SlotState.STOPPED in TRANSITIONS[state] for state in SlotState if state is not SlotState.STOPPED)


def test_retarget_only_while_drained():
    slot = _slot()
    slot.move_to(SlotState.READY)
    new = Target("chat@2", Path("/models/b"), {}, 100)
    with pytest.raises(InvalidTransitionError):
        slot.retarget(new)  # still routed
    slot.move_to(SlotState.DRAINING)
    lease = slot.take_lease()
    with pytest.raises(InvalidTransitionError):
        slot.retarget(new)  # a response in flight would name the wrong version
    assert slot.cut_off() == 1 and lease.is_cut_off
    slot.retarget(new)  # what was cut off ends with model_swapped; it cannot be misnamed
    assert slot.version == "chat@2"


def test_only_output_options_change_on_a_serving_slot():
    slot = _slot()
    slot.move_to(SlotState.READY)
    slot.read_output_with({"tool_parser": "mistral"})
    assert slot.target.options == {"tool_parser": "mistral"} and slot.version == "chat@1"
    with pytest.raises(InvalidTransitionError):
        slot.read_output_with({"tool_parser": "mistral", "max_batch_size": 2})
    assert slot.target.options == {"tool_parser": "mistral"}


def test_leases_come_back_once_each():
    slot = _slot()
    lease = slot.take_lease()
    lease.release()
    lease.release()
    assert slot.num_leases == 0
