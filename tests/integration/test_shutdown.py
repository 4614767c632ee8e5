"""SIGTERM with a stream in flight, through a real `baton serve` process: /ready says 503 and
new requests are refused with Retry-After while the stream finishes; then exit 0. A second
SIGTERM exits at once."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.conftest import sse_errors
from tests.integration.test_cli import BATON, _free_port, _wait_healthy

LONG = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "temperature": 0, "stream": True}


@pytest.fixture
def serve(tiny_model_path, tmp_path):
    port = _free_port()
    command = [*BATON, "--home", str(tmp_path), "serve", "--model", str(tiny_model_path), "--name", "tiny", "--port", str(port)]
    command += ["--engine", "transformers", "--shutdown-timeout", "60"]
    log = tmp_path / "serve.log"
    with log.open("w") as output, subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT) as process:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log)
        yield url, process
        if process.poll() is None:
            process.kill()


def _stream_in_background(url: str) -> tuple[threading.Thread, list[str], threading.Event]:
    lines, started = [], threading.Event()

    def read():
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=LONG, timeout=120) as response:
                for line in filter(None, response.iter_lines()):  # events, not the blank lines between
                    lines.append(line)
                    started.set()
        except httpx.RemoteProtocolError:
            lines.append("cut")  # the server went away mid-stream

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30), "the stream did not start"
    return reader, lines, started


def test_sigterm_lets_the_stream_finish_while_ready_says_503(serve):
    url, process = serve
    assert httpx.get(f"{url}/ready").status_code == 200
    reader, lines, _ = _stream_in_background(url)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    ready = httpx.get(f"{url}/ready")
    refused = httpx.post(f"{url}/v1/chat/completions", json={**LONG, "stream": False, "max_tokens": 1})
    assert process.poll() is None, "exited with a stream in flight"
    assert (ready.status_code, ready.json()["status"]) == (503, "shutting_down")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "shutting_down"
    reader.join(timeout=90)
    assert lines[-1] == "data: [DONE]" and sse_errors(lines) == []
    assert process.wait(timeout=30) == 0


def test_a_second_sigterm_exits_at_once(serve):
    url, process = serve
    reader, lines, _ = _stream_in_background(url)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=15)
    reader.join(timeout=30)
    assert lines[-1] == "cut"  # the server did not wait for it
