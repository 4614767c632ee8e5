"""A real `baton serve` process on vLLM stops cleanly: SIGINT after an answer exits 0, and
nothing of vLLM's is left to fail at interpreter exit (an AsyncLLM kept alive until then
raised TypeError from its __del__ into the operator's terminal); a shutdown while a swap
starts a new engine does not wait for that start."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import psutil
import pytest

try:
    import vllm.v1.engine.async_llm  # noqa: F401
except ImportError:
    if os.environ.get("BATON_REQUIRE_VLLM"):
        raise
    pytest.skip("vLLM is not installed", allow_module_level=True)

from tests.conftest import build_tiny_model  # noqa: E402
from tests.integration.test_cli import BATON, _free_port, _wait_healthy  # noqa: E402
from tests.vllm.test_vllm_engine import HELLO, VLLM_TINY  # noqa: E402


def test_sigint_stops_a_vllm_server_with_no_error_at_exit(tmp_path, demo_model_path):
    model = build_tiny_model(tmp_path / "model", demo_model_path, **VLLM_TINY)
    port = _free_port()
    command = [*BATON, "--home", str(tmp_path / "home"), "serve", "--model", str(model), "--name", "tiny"]
    command += ["--port", str(port), "--engine", "vllm", "--max-model-len", "512"]
    log = tmp_path / "serve.log"
    with log.open("w") as output, subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT) as process:
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, process, log, seconds=240)
            answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 4}, timeout=60)
            assert answer.status_code == 200
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    text = log.read_text()
    assert "Application shutdown complete" in text
    assert "Exception ignored" not in text and "Traceback" not in text, text[-3000:]


def _engine_cores(process: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.pid).children() if p.name().startswith("VLLM::")]


def test_a_shutdown_while_a_swap_starts_an_engine_does_not_wait_for_that_start(tmp_path, demo_model_path):
    """The new engine's start ran on in its thread, and the process waited for it before it
    exited (a minute on a GPU, even after a second signal): its processes are killed now,
    the server exits 0, and no vLLM process is left behind."""
    model = build_tiny_model(tmp_path / "model", demo_model_path, **VLLM_TINY)
    home = str(tmp_path / "home")
    subprocess.run([*BATON, "--home", home, "models", "import", str(model), "--name", "tiny"], check=True, capture_output=True)
    port = _free_port()
    command = [*BATON, "--home", home, "serve", "--model", "tiny@1", "--port", str(port), "--engine", "vllm", "--max-model-len", "512"]
    log = tmp_path / "serve.log"
    with log.open("w") as output, subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT) as process:
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, process, log, seconds=240)
            swap = {"to": "tiny@1", "engine_options": {"max_model_len": 256}, "wait": False}
            assert httpx.post(f"{url}/admin/deployments/tiny/swap", json=swap, timeout=30).status_code == 200
            deadline = time.monotonic() + 120
            while len(_engine_cores(process)) < 2:  # the new engine's core is starting
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            engine_processes = [p for p in psutil.Process(process.pid).children(recursive=True) if p.name().startswith("VLLM::")]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 0
        finally:
            if process.poll() is None:
                process.kill()
    text = log.read_text()
    assert "vLLM engines still starting" in text, text[-3000:]
    assert "init engine (profile, create kv cache, warmup model) took" not in text.split("SIGTERM")[-1]  # the new engine never finished its start
    left = [p for p in engine_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], left
