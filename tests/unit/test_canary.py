"""Which requests a canary takes (by weight; for a request naming its `user`, the same answer
for that user all through the canary), and what an abort leaves behind."""

from pathlib import Path

from server.deployments.deployment import Canary, Deployment
from server.deployments.slot import Slot, SlotState, Target
from tests.fake_engine import FakeBehaviour, FakeEngine

USERS = [f"user-{number}" for number in range(4000)]


def _slot(version: str) -> Slot:
    return Slot(Target(version, Path("/models") / version, {}, 100), FakeEngine(version, FakeBehaviour()))


def _canary(weight: int, version: str = "chat@2") -> Canary:
    return Canary(_slot(version), weight)


def _taken(canary: Canary) -> set[str]:
    return {user for user in USERS if canary.takes(user, draw=0.0)}  # a draw that would always take it


def test_without_a_user_the_draw_decides():
    canary = _canary(10)
    assert canary.takes(None, 9.99) and not canary.takes(None, 10.0)


def test_a_user_gets_one_answer_whatever_the_draw():
    canary = _canary(50)
    for user in USERS[:200]:
        assert {canary.takes(user, draw) for draw in (0.0, 49.0, 51.0, 99.9)} in ({True}, {False})


def test_about_weight_percent_of_users_go_to_the_canary():
    assert 0.08 < len(_taken(_canary(10))) / len(USERS) < 0.12
    assert 0.46 < len(_taken(_canary(50))) / len(USERS) < 0.54


def test_a_step_up_only_moves_users_onto_the_canary():
    at_10, at_25, at_50 = (_taken(_canary(weight)) for weight in (10, 25, 50))
    assert at_10 < at_25 < at_50


def test_each_canary_version_samples_its_own_users():
    chat2, chat3 = _taken(_canary(10, "chat@2")), _taken(_canary(10, "chat@3"))
    assert len(chat2 & chat3) < len(chat2) / 2  # independent samples share about a tenth


def test_an_aborted_canarys_version_is_remembered_until_a_canary_of_it_starts_again():
    active = _slot("chat@1")
    active.state = SlotState.READY
    deployment = Deployment("chat", active, max_waiting=4, max_wait_seconds=1.0)
    deployment.start_canary(_slot("chat@2"), 10)
    assert deployment.abort_canary().version == "chat@2"
    assert (deployment.canary, deployment.aborted_canary) == (None, "chat@2")
    deployment.start_canary(_slot("chat@3"), 10)  # another version: chat@2 stays aborted
    deployment.end_canary()  # promoted, say
    assert deployment.aborted_canary == "chat@2"
    deployment.start_canary(_slot("chat@2"), 10)  # tried again
    assert deployment.aborted_canary is None
