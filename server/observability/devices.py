"""The accelerators of this node, seen through NVML: no CUDA context is created, so engine
processes started later are unaffected. Without a GPU (or without `nvidia-ml-py`) there are none."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuMemory:
    total_bytes: int
    free_bytes: int


def gpu_memory() -> list[GpuMemory]:
    """Total and free memory of each GPU, read now; empty without one."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, no device: a CPU node
        return []
    try:
        infos = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
        return [GpuMemory(info.total, info.free) for info in infos]
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_bytes() -> list[int]:
    """Total memory of each GPU; empty without one."""
    return [gpu.total_bytes for gpu in gpu_memory()]
