import pytest

from server.deployments.recovery import MAX_DELAY_S, restart_delay_s


def test_the_first_restart_is_immediate_then_the_delay_doubles_up_to_a_minute():
    assert [restart_delay_s(n) for n in range(9)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert restart_delay_s(1000) == MAX_DELAY_S


def test_a_negative_count_is_a_bug():
    with pytest.raises(ValueError):
        restart_delay_s(-1)
