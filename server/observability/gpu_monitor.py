"""GPU utilisation through NVML, sampled on a thread of its own every `interval_s` (never on a
request's path, never on the event loop): per device utilisation, memory, power, temperature,
and the memory each process holds, mapped to the deployment and version it serves.

Without NVML or a GPU: `baton_gpu_available 0` and no GPU series. An NVML error at run time
is logged once, and the series are marked stale (`baton_gpu_sample_stale 1`) until a sample
succeeds again. `nvml` is the `pynvml` module, or an honest fake of it in tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float
    temperature_celsius: float
    process_memory_bytes: dict[int, int] = field(default_factory=dict)  # pid -> bytes


def load_nvml():
    """pynvml, initialised; None without the package, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


class GpuMonitor:
    def __init__(self, nvml, interval_s: float, owners: Callable[[], dict[int, tuple[str, str]]] = dict):
        """`owners`: pid -> (deployment, version), for the processes baton's engines run in."""
        self._nvml = nvml
        self._interval_s = interval_s
        self._owners = owners
        self.samples: list[GpuSample] = []
        self.sampled_at: float | None = None
        self.is_stale = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_available(self) -> bool:
        return self._nvml is not None

    def start(self) -> None:
        if self.is_available:
            self._thread = threading.Thread(target=self._sample_forever, name="baton-gpu-monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down: nothing to report to
                pass

    def sample_once(self) -> None:
        """One reading of every device; on an NVML error the last one stays, marked stale."""
        try:
            self.samples = [self._read(index) for index in range(self._nvml.nvmlDeviceGetCount())]
        except self._nvml.NVMLError as error:
            if not self.is_stale:
                log.error("NVML failed (%s); GPU series are stale until it answers again", error)
            self.is_stale = True
            return
        self.sampled_at, self.is_stale = time.time(), False

    def status(self) -> dict:
        """For /admin/status. (Not `describe`: Prometheus asks collectors for that.)"""
        owners = self._owners()
        return {
            "available": self.is_available,
            "stale": self.is_stale,
            "sampled_at": self.sampled_at,
            "devices": [
                {**asdict(s), "process_memory_bytes": {str(pid): b for pid, b in s.process_memory_bytes.items()}, "engines": _engines_on(s, owners)}
                for s in self.samples
            ],
        }

    def collect(self):
        """Prometheus collector: the last sample, read at scrape time."""
        available = GaugeMetricFamily("baton_gpu_available", "1 when NVML sees a GPU")
        available.add_metric((), 1 if self.is_available and self.samples else 0)
        yield available
        if not self.samples:
            return
        stale = GaugeMetricFamily("baton_gpu_sample_stale", "1 while NVML fails and the last sample is shown")
        stale.add_metric((), 1 if self.is_stale else 0)
        yield stale
        families = {
            "utilization_percent": GaugeMetricFamily("baton_gpu_utilization_percent", "GPU utilisation", labels=("gpu",)),
            "memory_used_bytes": GaugeMetricFamily("baton_gpu_memory_used_bytes", "GPU memory used", labels=("gpu",)),
            "memory_total_bytes": GaugeMetricFamily("baton_gpu_memory_total_bytes", "GPU memory in all", labels=("gpu",)),
            "power_watts": GaugeMetricFamily("baton_gpu_power_watts", "Power draw", labels=("gpu",)),
            "temperature_celsius": GaugeMetricFamily("baton_gpu_temperature_celsius", "Temperature", labels=("gpu",)),
        }
        held = GaugeMetricFamily("baton_gpu_engine_memory_bytes", "GPU memory held by the processes of each engine", labels=("gpu", "deployment", "version"))
        owners = self._owners()
        for sample in self.samples:
            for attribute, family in families.items():
                family.add_metric((str(sample.index),), getattr(sample, attribute))
            for (deployment, version), num_bytes in _engine_bytes(sample, owners).items():
                held.add_metric((str(sample.index), deployment, version), num_bytes)
        yield from families.values()
        yield held

    def _sample_forever(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self._interval_s)

    def _read(self, index: int) -> GpuSample:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        name = nvml.nvmlDeviceGetName(handle)
        return GpuSample(
            index=index,
            name=name.decode() if isinstance(name, bytes) else name,
            utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            memory_used_bytes=memory.used,
            memory_total_bytes=memory.total,
            power_watts=nvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            temperature_celsius=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            process_memory_bytes={p.pid: p.usedGpuMemory or 0 for p in processes},
        )


def _engine_bytes(sample: GpuSample, owners: dict[int, tuple[str, str]]) -> dict[tuple[str, str], int]:
    held: dict[tuple[str, str], int] = {}
    for pid, num_bytes in sample.process_memory_bytes.items():
        if pid in owners:
            held[owners[pid]] = held.get(owners[pid], 0) + num_bytes
    return held


def _engines_on(sample: GpuSample, owners: dict[int, tuple[str, str]]) -> list[dict]:
    return [{"deployment": d, "version": v, "memory_bytes": b} for (d, v), b in _engine_bytes(sample, owners).items()]

