"""A real `baton serve` process on vLLM stops cleanly: SIGINT after an answer exits 0, and
nothing of vLLM's is left to fail at interpreter exit (an AsyncLLM kept alive until then
raised TypeError from its __del__ into the operator's terminal)."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
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
