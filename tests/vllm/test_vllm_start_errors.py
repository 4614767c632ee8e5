"""A vLLM engine that fails to start in its engine core, behind a real `baton serve`: the
caller of the swap learns the engine core's own error (vLLM's parent says only "see root
cause above", which an admin-API caller cannot see), and the old version keeps serving."""

from __future__ import annotations

import json
import subprocess

import httpx

from tests.conftest import build_tiny_model
from tests.integration.test_cli import BATON, _free_port, _wait_healthy
from tests.vllm.test_vllm_engine import HELLO, VLLM_TINY


def test_a_swap_whose_vllm_engine_cannot_start_names_the_engine_cores_error(tmp_path, demo_model_path):
    good = build_tiny_model(tmp_path / "good", demo_model_path, **VLLM_TINY)
    broken = build_tiny_model(tmp_path / "broken", demo_model_path, **VLLM_TINY)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))  # weights no longer fit
    home = str(tmp_path / "home")
    for folder, engine in ((good, "transformers"), (broken, "vllm")):
        subprocess.run([*BATON, "--home", home, "models", "import", str(folder), "--name", "chat", "--engine", engine, "--max-model-len", "512"], check=True, capture_output=True, timeout=120)
    port, log = _free_port(), tmp_path / "serve.log"
    with log.open("w") as output, subprocess.Popen([*BATON, "--home", home, "serve", "--model", "chat@1", "--port", str(port)], stdout=output, stderr=subprocess.STDOUT) as process:
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, process, log)
            failure = httpx.post(f"{url}/admin/deployments/chat/swap", json={"to": "chat@2"}, timeout=300).json()["error"]
            assert failure["code"] == "swap_failed" and "chat@1 keeps serving" in failure["message"], failure
            assert "RuntimeError: start (0) + length (1024) exceeds dimension size (512)" in failure["message"], failure
            answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "chat", "messages": HELLO, "max_tokens": 2}, timeout=60)
            assert answer.headers["x-baton-version"] == "chat@1"
        finally:
            process.kill()
    assert "exceeds dimension size" in log.read_text()  # and the whole traceback still reached the server's log
