"""How much memory a version may take: pure arithmetic over the budget and, on a GPU, the
device's free memory (read through NVML by the caller), so every rule is a unit test.

vLLM reserves a fixed share of the whole device (`gpu_memory_utilization`: weights,
activations and KV cache) and refuses to start when that share exceeds free memory. A fixed
0.85 leaves no room for a second engine; the plan sizes each engine from what is free.
"""

from __future__ import annotations

import math

from models.errors import ConflictError

MAX_GPU_SHARE = 0.95  # vLLM's own ceiling in practice: CUDA graphs and NCCL need the rest


def fits(in_use_bytes: int, extra_bytes: int, budget_bytes: int) -> bool:
    return in_use_bytes + extra_bytes <= budget_bytes


def usable_gpu_bytes(total_bytes: int, free_bytes: int, headroom_bytes: int, num_engines: int) -> int:
    """What a new vLLM engine may take: what is free now less the headroom, and at most a
    `num_engines`-th of the device less the headroom (2 keeps room for a blue-green swap:
    each version in turn gets the same half)."""
    if num_engines < 1:
        raise ValueError("num_engines must be at least 1")
    return int(min(free_bytes - headroom_bytes, (total_bytes - headroom_bytes) / num_engines))


def plan_gpu_share(total_bytes: int, free_bytes: int, headroom_bytes: int, num_engines: int, needed_bytes: int = 0) -> float:
    """The `gpu_memory_utilization` for a new vLLM engine: its usable memory as a fraction of
    the whole device, rounded down to a percent so that vLLM's own check passes. A share
    below `needed_bytes` (the version's weights with their buffers) is refused here, before
    vLLM starts and fails on it."""
    usable = usable_gpu_bytes(total_bytes, free_bytes, headroom_bytes, num_engines)
    share = min(MAX_GPU_SHARE, math.floor(100 * usable / total_bytes) / 100)
    if share < 0.01 or share * total_bytes < needed_bytes:
        raise ConflictError(
            f"The GPU has {free_bytes} bytes free of {total_bytes}; with {headroom_bytes} bytes of headroom "
            f"there is no room for {'an engine' if num_engines == 1 else f'{num_engines} engines'} needing {needed_bytes} bytes.",
            code="insufficient_gpu_memory",
        )
    return share
