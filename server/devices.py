"""The accelerators of this node, seen through NVML: no CUDA context is created, so engine
processes started later are unaffected. Without a GPU (or without `nvidia-ml-py`) there are none."""

from __future__ import annotations


def gpu_memory_bytes() -> list[int]:
    """Total memory of each GPU; empty without one."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, no device: a CPU node
        return []
    try:
        return [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()
