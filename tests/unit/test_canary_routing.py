"""Which requests a canary takes: by weight, and for a request naming its `user`, the same
answer for that user all through the canary."""

from pathlib import Path

from server.deployments.deployment import Canary
from server.deployments.slot import Slot, Target
from tests.fake_engine import FakeBehaviour, FakeEngine

USERS = [f"user-{number}" for number in range(4000)]


def _canary(weight: int, version: str = "chat@2") -> Canary:
    return Canary(Slot(Target(version, Path("/models/b"), {}, 100), FakeEngine("b", FakeBehaviour())), weight)


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
