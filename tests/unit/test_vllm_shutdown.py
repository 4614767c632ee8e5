"""The rule of `_shut_down`, with real processes standing in for vLLM's: an engine core is
killed once its workers have exited (only its exit-time collection is left), and a core with
no workers is left to exit as vLLM has it."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil

from server.engines.vllm_engine import _shut_down

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


class _Engine:
    """vLLM's shutdown as it behaves: its workers are told to exit, then the core is waited for."""

    def __init__(self, core: subprocess.Popen, workers: list[subprocess.Popen]):
        self._core, self._workers = core, workers

    def shutdown(self) -> None:
        for worker in self._workers:
            worker.terminate()
        if not self._workers:
            self._core.terminate()
        self._core.wait(timeout=60)


def _run(num_workers: int) -> subprocess.Popen:
    core, workers = subprocess.Popen(SLEEPER), [subprocess.Popen(SLEEPER) for _ in range(num_workers)]
    try:
        _shut_down(_Engine(core, workers), [psutil.Process(core.pid)], [psutil.Process(w.pid) for w in workers])
    finally:
        for process in (core, *workers):
            process.kill()
            process.wait()
    return core


def test_a_core_whose_workers_have_exited_is_killed_not_waited_for():
    assert _run(num_workers=2).returncode == -signal.SIGKILL


def test_a_core_with_no_workers_exits_as_vllm_has_it():
    assert _run(num_workers=0).returncode == -signal.SIGTERM
