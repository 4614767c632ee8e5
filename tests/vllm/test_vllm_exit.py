"""A real `baton serve` process on vLLM stops cleanly: SIGINT after an answer exits 0, and
nothing of vLLM's is left to fail at interpreter exit (an AsyncLLM kept alive until then
raised TypeError from its __del__ into the operator's terminal); a signal while an engine
starts (a swap's, or start-up's) does not wait for that start."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from tests.conftest import build_tiny_model
from tests.integration.test_cli import BATON, _free_port, _wait_healthy
from tests.vllm.test_vllm_engine import HELLO, VLLM_TINY

NEVER_STARTED = "init engine (profile, create kv cache, warmup model) took"  # vLLM's line once an engine core is up


@contextlib.contextmanager
def _serve(home: Path, model: str, log: Path, port: int) -> Iterator[subprocess.Popen]:
    """`baton serve` on vLLM, killed at the end if the test left it running."""
    command = [*BATON, "--home", str(home), "serve", "--model", model, "--port", str(port), "--engine", "vllm", "--max-model-len", "512"]
    with log.open("w") as output, subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def _engine_processes(process: subprocess.Popen, recursive: bool = False) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.pid).children(recursive=recursive) if p.name().startswith("VLLM::")]


def _wait_for_cores(process: subprocess.Popen, log: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(_engine_processes(process)) < count:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _left(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigint_stops_a_vllm_server_with_no_error_at_exit(tmp_path, demo_model_path):
    model = build_tiny_model(tmp_path / "model", demo_model_path, **VLLM_TINY)
    port, log = _free_port(), tmp_path / "serve.log"
    with _serve(tmp_path / "home", str(model), log, port) as process:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log, seconds=240)
        answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "model", "messages": HELLO, "max_tokens": 4}, timeout=60)
        assert answer.status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    text = log.read_text()
    assert "Application shutdown complete" in text
    assert "Exception ignored" not in text and "Traceback" not in text, text[-3000:]


def test_a_shutdown_while_a_swap_starts_an_engine_does_not_wait_for_that_start(tmp_path, demo_model_path):
    """The new engine's start ran on in its thread, and the process waited for it before it
    exited (a minute on a GPU, even after a second signal): its processes are killed now,
    the server exits 0, and no vLLM process is left behind."""
    model = build_tiny_model(tmp_path / "model", demo_model_path, **VLLM_TINY)
    home, port, log = tmp_path / "home", _free_port(), tmp_path / "serve.log"
    subprocess.run([*BATON, "--home", str(home), "models", "import", str(model), "--name", "tiny"], check=True, capture_output=True)
    with _serve(home, "tiny@1", log, port) as process:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log, seconds=240)
        swap = {"to": "tiny@1", "engine_options": {"max_model_len": 256}, "wait": False}
        assert httpx.post(f"{url}/admin/deployments/tiny/swap", json=swap, timeout=30).status_code == 200
        _wait_for_cores(process, log, 2)  # the new engine's core is starting
        engine_processes = _engine_processes(process, recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    text = log.read_text()
    assert "of engines still starting" in text, text[-3000:]
    assert NEVER_STARTED not in text.split("SIGTERM")[-1]
    assert _left(engine_processes) == []


def test_ctrl_c_while_the_server_starts_does_not_wait_for_its_engine(tmp_path, demo_model_path):
    """Start-up's loads waited out every engine start before a signal could stop the server
    (`make serve`, Ctrl-C: a minute per engine on a GPU); now the start is cut short."""
    model = build_tiny_model(tmp_path / "model", demo_model_path, **VLLM_TINY)
    log = tmp_path / "serve.log"
    with _serve(tmp_path / "home", str(model), log, _free_port()) as process:
        _wait_for_cores(process, log, 1)  # its engine is starting
        engine_processes = _engine_processes(process, recursive=True)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
    text = log.read_text()
    assert "start-up cut short by the shutdown" in text and NEVER_STARTED not in text, text[-3000:]
    assert _left(engine_processes) == []
