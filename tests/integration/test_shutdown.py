"""SIGTERM with a stream in flight, through a real `baton serve` process: /ready says 503 and
new requests are refused with Retry-After while the stream finishes; then exit 0. A second
SIGTERM exits at once. A background Response is waited for as a stream is, and one cut off
reads `failed` after the next start."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import closing, contextmanager

import httpx
import openai
import pytest

from server.lifecycle import CUT_OFF_S
from tests.conftest import sse_errors
from tests.integration.test_cli import BATON, _free_port, _wait_healthy

LONG = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "temperature": 0, "stream": True}


@pytest.fixture
def serve(tiny_model_path, tmp_path, request):
    port = _free_port()
    command = [*BATON, "--home", str(tmp_path), "serve", "--model", str(tiny_model_path), "--name", "tiny", "--port", str(port)]
    command += ["--engine", "transformers", "--shutdown-timeout", str(getattr(request, "param", 60))]
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


@pytest.mark.parametrize("serve", [1], indirect=True)
def test_a_stream_still_going_at_the_shutdown_deadline_is_cut_off_there(serve):
    url, process = serve
    reader, lines, _ = _stream_in_background(url)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert process.wait(timeout=30) == 0
    reader.join(timeout=30)
    assert time.monotonic() - signalled < 1 + CUT_OFF_S + 5, "the exit waited for the stream"
    assert lines[-1] != "data: [DONE]"  # cut off, not finished


def _background_response(url: str) -> str:
    """A Responses request generating in the background, by its id."""
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 3000, "temperature": 0, "background": True}
    started = httpx.post(f"{url}/v1/responses", json=body, timeout=60).json()
    assert started["status"] == "in_progress", started
    return started["id"]


def _after_a_restart(serve_again, response_id: str) -> dict:
    with serve_again() as url:
        return httpx.get(f"{url}/v1/responses/{response_id}", timeout=30).json()


@pytest.fixture
def serve_again(tiny_model_path, tmp_path):
    """A second `baton serve` on the first one's home, as a context manager."""

    @contextmanager
    def run():
        port = _free_port()
        command = [*BATON, "--home", str(tmp_path), "serve", "--model", str(tiny_model_path), "--name", "tiny", "--port", str(port), "--engine", "transformers"]
        with (tmp_path / "serve-again.log").open("w") as output, subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT) as process:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, process, tmp_path / "serve-again.log")
            yield url
            process.terminate()

    return run


def test_sigterm_waits_for_a_background_response_and_keeps_it(serve, serve_again):
    url, process = serve
    response_id = _background_response(url)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    kept = _after_a_restart(serve_again, response_id)
    assert kept["status"] == "incomplete" and kept["usage"]["output_tokens"] == 3000  # finished in the drain


def test_a_background_response_cut_off_by_a_second_sigterm_reads_failed_after_the_restart(serve, serve_again):
    url, process = serve
    response_id = _background_response(url)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=15)
    kept = _after_a_restart(serve_again, response_id)
    assert (kept["status"], kept["error"]["code"]) == ("failed", "server_error"), kept  # not in_progress for ever


def test_sigterm_finishes_a_batchs_requests_in_flight_and_the_restart_runs_the_rest(serve, serve_again, tmp_path):
    """The drain lets the batch's requests in flight finish and starts no more; the next
    start answers the rest, each request once."""
    url, process = serve
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    lines = [json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": {**LONG, "stream": False, "max_tokens": 200}}) for n in range(40)]
    upload = client.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch_id = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id
    while client.batches.retrieve(batch_id).request_counts.completed < 1:
        time.sleep(0.1)
    client.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    with closing(sqlite3.connect(tmp_path / "batches.db")) as db:
        cut = json.loads(db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
    assert cut["status"] == "in_progress" and 1 <= cut["request_counts"]["completed"] < 40
    with serve_again() as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while (batch := client.batches.retrieve(batch_id)).status != "completed":
            assert time.monotonic() < deadline and batch.status == "in_progress", batch.status
            time.sleep(0.2)
        answered = [json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).text.splitlines()]
        client.close()
    assert sorted(answered) == sorted(f"r{n}" for n in range(40))
