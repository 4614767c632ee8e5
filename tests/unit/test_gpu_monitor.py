"""The NVML sampler with an honest fake of pynvml (the same calls, values and error type), and
the no-GPU path for real."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from server.observability.gpu_monitor import GpuMonitor, load_nvml


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeNvml:
    """pynvml's calls used by the monitor, over two H100-like devices."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    processes: dict[int, list[tuple[int, int]]] = field(default_factory=lambda: {0: [(4242, 30 << 30), (99, 1 << 30)], 1: []})
    is_failing: bool = False
    num_shutdowns: int = 0

    def nvmlDeviceGetCount(self):
        if self.is_failing:
            raise FakeNVMLError("GPU is lost")
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 << 30, used=(31 << 30) if handle == 0 else 0, free=(49 << 30) if handle == 0 else 80 << 30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87 if handle == 0 else 0, memory=40)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 412_000  # milliwatts

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes[handle]]

    def nvmlShutdown(self):
        self.num_shutdowns += 1


def _exported(monitor: GpuMonitor) -> str:
    registry = CollectorRegistry()
    registry.register(monitor)
    return generate_latest(registry).decode()


def test_a_sample_reads_every_device_and_maps_engine_memory_to_its_deployment():
    monitor = GpuMonitor(FakeNvml(), 5.0, owners=lambda: {4242: ("chat", "chat@2")})
    monitor.sample_once()
    text = _exported(monitor)
    assert "baton_gpu_available 1.0" in text
    assert 'baton_gpu_utilization_percent{gpu="0"} 87.0' in text and 'baton_gpu_power_watts{gpu="1"} 412.0' in text
    assert 'baton_gpu_engine_memory_bytes{deployment="chat",gpu="0",version="chat@2"} 3.221225472e+10' in text
    status = monitor.status()
    assert status["devices"][0]["engines"] == [{"deployment": "chat", "version": "chat@2", "memory_bytes": 30 << 30}]
    assert status["devices"][0]["name"] == "NVIDIA H100 80GB HBM3" and not status["stale"]


def test_an_nvml_error_keeps_the_last_sample_marked_stale_and_logs_once(caplog):
    nvml = FakeNvml()
    monitor = GpuMonitor(nvml, 5.0)
    monitor.sample_once()
    nvml.is_failing = True
    monitor.sample_once()
    monitor.sample_once()
    assert "baton_gpu_sample_stale 1.0" in _exported(monitor) and len(monitor.samples) == 2
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    nvml.is_failing = False
    monitor.sample_once()
    assert "baton_gpu_sample_stale 0.0" in _exported(monitor)


def test_the_sampler_runs_on_its_own_thread_and_stops():
    nvml = FakeNvml()
    monitor = GpuMonitor(nvml, 0.01)
    monitor.start()
    try:
        import time

        deadline = time.monotonic() + 5
        while monitor.sampled_at is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        monitor.stop()
    assert nvml.num_shutdowns == 1


def test_without_a_gpu_it_says_so_and_exports_no_gpu_series():
    nvml = load_nvml()  # no driver on CI machines: None, for real
    monitor = GpuMonitor(nvml, 5.0)
    monitor.start()
    monitor.stop()
    if nvml is None:
        text = _exported(monitor)
        assert "baton_gpu_available 0.0" in text and "baton_gpu_utilization_percent" not in text
        assert monitor.status() == {"available": False, "stale": False, "sampled_at": None, "devices": []}


def test_baton_status_prints_slots_memory_and_gpus_as_tables():
    from server.cli.deploy import format_status

    monitor = GpuMonitor(FakeNvml(), 5.0, owners=lambda: {4242: ("chat", "chat@2")})
    monitor.sample_once()
    slot = {"version": "chat@2", "state": "ready", "engine": "vllm", "in_flight": 3, "memory_bytes": 68 << 30, "memory_plan": "gpu_memory_utilization 0.85 planned"}
    deployment = {"name": "chat", "version": "chat@2", "state": "ready", "in_flight": 3, "waiting": 0, "active": slot, "canary": None, "standby": {**slot, "version": "chat@1", "state": "asleep", "in_flight": 0}}
    status = {"deployments": [deployment], "memory_budget_bytes": 80 << 30, "memory_in_use_bytes": 68 << 30, "gpus": monitor.status()}
    table = format_status(status)
    assert "chat           active   chat@2" in table and "standby  chat@1             asleep" in table
    assert "68.0 GiB in use of 80.0 GiB" in table
    assert "NVIDIA H100 80GB HBM3" in table and "87%" in table and "chat chat@2 30.0 GiB" in table
    assert "GPUs: none" in format_status({**status, "gpus": GpuMonitor(None, 5.0).status()})
    assert "config" not in table  # no config file
    halted = "! chat: chat@2; the canary of chat@3 was aborted (start it again by hand, or name another version)"
    assert f"config /etc/baton.yaml: differs\n  {halted}" in format_status({**status, "config_file": "/etc/baton.yaml", "drift": [halted]})
    assert "config /etc/baton.yaml: what runs is what it says" in format_status({**status, "config_file": "/etc/baton.yaml", "drift": []})
    unreadable = format_status({**status, "config_file": "/etc/baton.yaml", "drift": None, "config_error": "baton.yaml:3: not valid YAML"})
    assert "config /etc/baton.yaml: cannot be read: baton.yaml:3: not valid YAML" in unreadable
