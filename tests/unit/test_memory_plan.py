"""The memory plan alone: vLLM's GPU share from free memory, headroom and engine count."""

import pytest

from models.errors import ConflictError
from server.deployments.memory_plan import MAX_GPU_SHARE, fits, plan_gpu_share, usable_gpu_bytes

GIB = 2**30
H100 = 80 * GIB


def test_one_engine_takes_what_is_free_less_the_headroom():
    assert plan_gpu_share(H100, 40 * GIB, 2 * GIB, 1) == 0.47  # 38 of 80 GiB, rounded down


def test_two_engines_each_take_half_so_a_blue_green_fits():
    share = plan_gpu_share(H100, 79 * GIB, 2 * GIB, 2)
    assert share == 0.48
    assert 2 * share * H100 <= 79 * GIB - 2 * GIB


def test_with_room_for_two_every_version_in_turn_gets_the_same_half():
    first = plan_gpu_share(H100, 79 * GIB, 2 * GIB, 2)
    left = int(79 * GIB - first * H100)
    second = plan_gpu_share(H100, left, 2 * GIB, 2)
    assert second == first and second * H100 <= left  # vLLM's own check: share x total within free memory


def test_a_share_rounds_down_so_vllm_never_finds_too_little_free():
    share = plan_gpu_share(1000, 999, 0, 1)
    assert share * 1000 <= 999


def test_never_more_than_the_ceiling():
    assert plan_gpu_share(H100, H100, 0, 1) == MAX_GPU_SHARE


def test_no_room_is_a_conflict_naming_the_figures():
    with pytest.raises(ConflictError, match=f"has {GIB} bytes free of {H100}") as refused:
        plan_gpu_share(H100, GIB, 2 * GIB, 1)
    assert refused.value.code == "insufficient_gpu_memory"


def test_a_share_below_what_the_version_needs_is_refused_before_vllm_starts():
    # Seen on an H100: one engine held 0.95 of the device; 3.5 GiB free less 2 GiB headroom
    # planned 0.01 for a 1B model, and vLLM failed with "no available memory for the cache blocks".
    with pytest.raises(ConflictError, match=f"needing {3 * GIB} bytes") as refused:
        plan_gpu_share(H100, 3 * GIB + GIB // 2, 2 * GIB, 1, needed_bytes=3 * GIB)
    assert refused.value.code == "insufficient_gpu_memory"
    assert plan_gpu_share(H100, 40 * GIB, 2 * GIB, 1, needed_bytes=3 * GIB) == 0.47


def test_usable_memory_is_what_is_free_less_headroom_within_the_engine_share():
    assert usable_gpu_bytes(H100, 40 * GIB, 2 * GIB, 1) == 38 * GIB
    assert usable_gpu_bytes(H100, 79 * GIB, 2 * GIB, 2) == 39 * GIB
    assert usable_gpu_bytes(H100, GIB, 2 * GIB, 1) < 0


def test_engine_count_must_be_positive():
    with pytest.raises(ValueError):
        plan_gpu_share(H100, H100, 0, 0)


def test_fits_is_inclusive_of_the_budget():
    assert fits(60, 40, 100) and not fits(60, 41, 100)
