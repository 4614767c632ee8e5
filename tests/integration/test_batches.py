"""OpenAI's Batch API through the official client, against real servers: a file of requests
uploaded, run in-process, each answer the one its endpoint gives; bad files refused line by
line; a cancel that keeps what was answered; a restart in the middle that answers each
request once; files and batches their key's alone."""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import openai
import pytest

from server.auth.keys import key
from server.batches import runner
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread
from tests.fake_engine import FakeBehaviour, FakeEngineFactory

ENDED = ("completed", "failed", "cancelled", "expired")


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _chat(model: str, text: str, max_tokens: int = 4) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


def _upload(client, lines: list[str]):
    return client.files.create(file=("requests.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")


def _ended(client, batch_id: str, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while (batch := client.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, f"the batch is still {batch.status}"
        time.sleep(0.1)
    return batch


def _answers(client, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    return {answer["custom_id"]: answer["response"] for answer in map(json.loads, client.files.content(file_id).text.splitlines())}


def test_a_batch_answers_each_request_as_its_endpoint_does_and_files_the_failures_apart(tiny_server):
    client = tiny_server.client()
    asked = {f"r{n}": _chat("tiny", f"Hello number {n}") for n in range(5)}
    upload = _upload(client, [_line(custom_id, body) for custom_id, body in asked.items()] + [_line("unknown-model", _chat("nope", "hi"))])
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "nightly"})
    assert (batch.status, batch.metadata) == ("validating", {"job": "nightly"})
    batch = _ended(client, batch.id)
    assert (batch.status, batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 6, 5, 1)
    answered = _answers(client, batch.output_file_id)
    assert set(answered) == set(asked) and all(response["status_code"] == 200 and response["request_id"] for response in answered.values())
    for custom_id, body in asked.items():
        direct = client.chat.completions.create(**body)
        assert answered[custom_id]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    failed = _answers(client, batch.error_file_id)
    assert failed["unknown-model"]["status_code"] == 404 and failed["unknown-model"]["body"]["error"]["code"] == "model_not_found"
    assert {f.id for f in client.files.list(purpose="batch_output")} >= {batch.output_file_id, batch.error_file_id}
    assert batch.id in [b.id for b in client.batches.list()]
    metrics = httpx.get(f"{tiny_server.url}/metrics").text
    assert re.search(r'^baton_batches\{status="completed"\} [1-9]', metrics, re.M) and "baton_batch_requests_pending" in metrics


def test_embeddings_and_responses_are_batched_too(tiny_server):
    client = tiny_server.client()
    upload = _upload(client, [_line("e0", {"model": "tiny", "input": "hello"}, "/v1/embeddings")])
    batch = _ended(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h").id)
    vector = _answers(client, batch.output_file_id)["e0"]["body"]["data"][0]["embedding"]
    assert vector == client.embeddings.create(model="tiny", input="hello").data[0].embedding
    asked = {"model": "tiny", "input": "Hello there", "max_output_tokens": 4, "temperature": 0}
    upload = _upload(client, [_line("r0", asked, "/v1/responses")])
    batch = _ended(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h").id)
    response = _answers(client, batch.output_file_id)["r0"]["body"]
    assert client.responses.retrieve(response["id"]).output_text == client.responses.create(**asked).output_text  # kept, as its key's


def test_a_file_with_bad_lines_fails_its_batch_naming_each_line(tiny_server):
    client = tiny_server.client()
    lines = [_line("a", _chat("tiny", "hi")), "not json", _line("a", _chat("tiny", "again")), _line("b", _chat("tiny", "hi"), "/v1/completions"), _line("c", {**_chat("tiny", "hi"), "stream": True})]
    batch = _ended(client, client.batches.create(input_file_id=_upload(client, lines).id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.output_file_id is None
    assert [(error.line, error.code) for error in batch.errors.data] == [(2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "mismatched_url"), (5, "invalid_request")]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input_file_id": "file-nosuch", "endpoint": "/v1/chat/completions", "completion_window": "24h"}, "input_file_id"),
        ({"input_file_id": "file-x", "endpoint": "/v1/moderations", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window"),
    ],
)
def test_bad_batch_requests_name_the_field(tiny_server, body, param):
    refused = httpx.post(f"{tiny_server.url}/v1/batches", json=body, timeout=30)
    assert refused.status_code in (400, 404) and refused.json()["error"]["param"] == param, refused.text


def test_an_upload_is_for_batches_within_its_size_and_its_keys_room(tiny_model_path, tmp_path):
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], max_file_bytes=2048, max_file_bytes_per_key=3000)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        client = server.client()
        with pytest.raises(openai.BadRequestError) as wrong_purpose:
            client.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
        assert wrong_purpose.value.body["param"] == "purpose"
        with pytest.raises(openai.APIStatusError) as too_big:
            client.files.create(file=("x.jsonl", io.BytesIO(b"x" * 4096)), purpose="batch")
        assert too_big.value.status_code == 413
        kept = client.files.create(file=("../../etc/passwd", io.BytesIO(b"{}")), purpose="batch")
        assert client.files.content(kept.id).content == b"{}" and not (tmp_path / "etc").exists()
        big = client.files.create(file=("a.jsonl", io.BytesIO(b"x" * 1500)), purpose="batch")
        with pytest.raises(openai.BadRequestError) as over_quota:  # 2 + 1500 + 1500 bytes: past the key's 3000
            client.files.create(file=("b.jsonl", io.BytesIO(b"x" * 1500)), purpose="batch")
        assert over_quota.value.body["code"] == "storage_limit_exceeded" and len(client.files.list().data) == 2
        client.files.delete(big.id)
        client.files.create(file=("b.jsonl", io.BytesIO(b"x" * 1500)), purpose="batch")  # room again
        client.files.delete(kept.id)
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(kept.id)


def _slow_server(tiny_model_path, home, **settings):
    factory = FakeEngineFactory(default=FakeBehaviour(token_seconds=0.05))
    return ServerThread(Settings(home=home, models=[ModelSpec(name="chat", path=tiny_model_path)], **settings), engine_factory=factory)


def test_a_cancelled_batch_keeps_what_was_answered(tiny_model_path, tmp_path):
    with _slow_server(tiny_model_path, tmp_path / "home") as server:
        client = server.client()
        upload = _upload(client, [_line(f"r{n}", _chat("chat", "hi", max_tokens=8)) for n in range(40)])
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        while client.batches.retrieve(batch.id).request_counts.completed < 8:
            time.sleep(0.05)
        assert client.batches.cancel(batch.id).status == "cancelling"
        batch = _ended(client, batch.id)
        answered = _answers(client, batch.output_file_id)
        assert batch.status == "cancelled" and 8 <= len(answered) == batch.request_counts.completed < 40
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["in_flight"] == 0


def test_a_restart_in_the_middle_of_a_batch_answers_each_request_once(tiny_model_path, tmp_path):
    with _slow_server(tiny_model_path, tmp_path / "home") as server:
        client = server.client()
        upload = _upload(client, [_line(f"r{n}", _chat("chat", "hi", max_tokens=8)) for n in range(40)])
        batch_id = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id
        while client.batches.retrieve(batch_id).request_counts.completed < 8:
            time.sleep(0.05)
    with _slow_server(tiny_model_path, tmp_path / "home") as server:
        client = server.client()
        batch = _ended(client, batch_id)
        lines = client.files.content(batch.output_file_id).text.splitlines()
        assert batch.status == "completed" and batch.request_counts.completed == 40
        assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(f"r{n}" for n in range(40))


def test_requests_a_busy_deployment_turns_away_are_asked_again(tiny_model_path, tmp_path, monkeypatch):
    """One request at a time and no queue: three of the four a batch sends at once get a 503
    overloaded; asked again with backoff, every one is answered."""
    monkeypatch.setattr(runner, "RETRY_BASE_S", 0.3)  # about 9 s of retries in all
    with _slow_server(tiny_model_path, tmp_path / "home", max_running_per_deployment=1, max_waiting=0) as server:
        client = server.client()
        upload = _upload(client, [_line(f"r{n}", _chat("chat", "hi", max_tokens=2)) for n in range(4)])
        batch = _ended(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id)
        assert (batch.status, batch.request_counts.completed, batch.error_file_id) == ("completed", 4, None), _answers(client, batch.error_file_id)


def test_a_batch_neither_waits_on_nor_uses_up_its_keys_rates(tiny_model_path, tmp_path):
    keys = [key("app", "app-secret", {"inference"}, tokens_per_minute=200)]
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        client = server.client(api_key="app-secret")
        upload = _upload(client, [_line(f"r{n}", _chat("chat", "hi", max_tokens=50)) for n in range(6)])  # 300 tokens and more: over what a minute allows
        batch = _ended(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id)
        assert batch.request_counts.completed == 6
        assert client.chat.completions.create(**_chat("chat", "hi")).choices  # the key's own minute is untouched


def test_files_and_batches_are_their_keys_alone_and_run_with_its_rights(tiny_model_path, tmp_path):
    keys = [key("app", "app-secret", {"inference"}), key("narrow", "narrow-secret", {"inference"}, {"other"})]
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        app, narrow = server.client(api_key="app-secret"), server.client(api_key="narrow-secret")
        upload = _upload(app, [_line("r0", _chat("chat", "hi"))])
        batch = _ended(app, app.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id)
        assert batch.request_counts.completed == 1
        for attempt in (lambda: narrow.files.retrieve(upload.id), lambda: narrow.files.content(batch.output_file_id), lambda: narrow.batches.retrieve(batch.id)):
            with pytest.raises(openai.NotFoundError):
                attempt()
        with pytest.raises(openai.NotFoundError):
            narrow.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        own = _upload(narrow, [_line("r0", _chat("chat", "hi"))])
        refused = _ended(narrow, narrow.batches.create(input_file_id=own.id, endpoint="/v1/chat/completions", completion_window="24h").id)
        assert _answers(narrow, refused.error_file_id)["r0"]["status_code"] == 403  # its key may not call chat, in a batch either
