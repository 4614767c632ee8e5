"""`baton serve` as a user runs it: a real process, a real port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

BATON = [sys.executable, "-m", "server.cli.main"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("baton serve did not become healthy")


def test_cli_serve_answers_the_openai_client(tiny_model_path, tmp_path):
    port = _free_port()
    command = [*BATON, "--home", str(tmp_path), "serve", "--model", str(tiny_model_path), "--name", "tiny", "--port", str(port), "--engine", "transformers"]
    command += ["--engine-option", "max_batch_size=3", "--engine-option", "cuda_graphs=false"]
    log = tmp_path / "serve.log"
    with log.open("w") as output, subprocess.Popen([*command, "--log-format", "json"], stdout=output, stderr=subprocess.STDOUT) as process:
        try:
            _serve_and_ask(f"http://127.0.0.1:{port}", process, log)
        finally:
            process.terminate()
            process.wait(timeout=30)
    logged = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    requests = [line for line in logged if line.get("event") == "request"]
    assert len(requests) == 1 and requests[0]["status"] == 200 and requests[0]["logger"] == "baton.requests"
    assert any(line["logger"].startswith("uvicorn") for line in logged)  # uvicorn's own lines are JSON too


def _serve_and_ask(url: str, process: subprocess.Popen, log: Path) -> None:
    _wait_healthy(url, process, log)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens <= 3 and reply.model == "tiny"
    details = httpx.get(f"{url}/health").json()["models"]["tiny"]["details"]
    assert details["max_batch_size"] == 3 and details["decode"].startswith("eager steps, padded cache")  # --engine-option


def test_cli_serve_missing_folder_is_a_clear_error(tmp_path):
    result = subprocess.run([*BATON, "serve", "--model", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr


def test_cli_serve_of_a_lora_adapter_says_how_to_import_it(tmp_path, tiny_model_path):
    from tests.unit.test_lora import write_adapter

    adapter = write_adapter(tmp_path / "adapter", tiny_model_path)
    result = subprocess.run([*BATON, "serve", "--model", str(adapter)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "is a LoRA adapter" in result.stderr and "--base" in result.stderr and "Traceback" not in result.stderr


def test_cli_serve_refuses_pickle_weights_by_default(tiny_model_path, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_path / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    result = subprocess.run([*BATON, "serve", "--model", str(folder)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "--allow-pickle" in result.stderr and "Traceback" not in result.stderr


def test_cli_serve_refuses_unknown_or_mistyped_engine_options(tiny_model_path):
    for option, named in (("cuda_graph=false", "Unknown engine option(s) cuda_graph"), ("cuda_graphs=maybe", "cuda_graphs"), ("tool_parser=bogus", "Unknown tool_parser 'bogus'")):
        result = subprocess.run([*BATON, "serve", "--model", str(tiny_model_path), "--engine-option", option], capture_output=True, text=True)
        assert result.returncode == 1 and named in result.stderr and "Traceback" not in result.stderr


def test_cli_rejects_a_bad_model_name(tiny_model_path):
    result = subprocess.run([*BATON, "serve", "--model", str(tiny_model_path), "--name", "../etc"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "must match" in result.stderr


def test_cli_refuses_to_serve_beyond_loopback_without_a_key(tiny_model_path):
    env = {k: v for k, v in os.environ.items() if k != "BATON_API_KEY"}
    command = [*BATON, "serve", "--model", str(tiny_model_path), "--host", "0.0.0.0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "--api-key" in result.stderr and "Traceback" not in result.stderr


def test_cli_invalid_swap_settings_name_the_field(tiny_model_path):
    result = subprocess.run([*BATON, "serve", "--model", str(tiny_model_path), "--drain-timeout", "-1"], capture_output=True, text=True)
    assert result.returncode == 1 and "drain_timeout_s" in result.stderr and "Traceback" not in result.stderr
