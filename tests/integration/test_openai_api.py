"""The OpenAI routes through a real server and the official openai client."""

from __future__ import annotations

import time

import httpx
import pytest
from transformers import AutoTokenizer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_chat_smollm2_answers_paris(smol_server):
    reply = smol_server.client().chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=20)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model.startswith("smollm2@")  # the version that served it


@pytest.mark.slow
def test_chat_is_served_by_the_registry_gguf_import(smol_server, demo_version):
    raw = smol_server.client().chat.completions.with_raw_response.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=20)
    assert raw.headers["x-baton-version"] == demo_version.ref
    assert demo_version.manifest.source["kind"] == "gguf"
    assert "Paris" in raw.parse().choices[0].message.content


@pytest.mark.slow
def test_chat_smollm2_streams_paris(smol_server):
    stream = smol_server.client().chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, max_tokens=20, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "Paris" in text
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_chat_usage_counts_equal_the_tokenizers(smol_server, demo_model_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    prompt = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    expected_prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
    reply = smol_server.client().chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=20)
    completion = tokenizer.encode(reply.choices[0].message.content, add_special_tokens=False)
    assert reply.usage.prompt_tokens == expected_prompt_tokens
    # the end-of-turn token is generated and counted, but not shown
    assert reply.usage.completion_tokens == len(completion) + 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_length_limit_gives_exact_usage(tiny_server):
    reply = tiny_server.client().completions.create(model="tiny", prompt="Hello there", max_tokens=7, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens == 2


def test_stream_include_usage_ends_with_totals(tiny_server):
    stream = tiny_server.client().chat.completions.create(
        model="tiny", messages=FRANCE, max_tokens=5, stream=True, stream_options={"include_usage": True}, temperature=0
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_matches_non_stream(tiny_server):
    client = tiny_server.client()
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


@pytest.mark.slow
def test_stop_sequence_cuts_the_text(smol_server):
    client = smol_server.client()
    reply = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, stop=["France"])
    assert reply.choices[0].message.content == "The capital of "
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, stop="is", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "The capital of France "


def test_same_seed_gives_same_text(tiny_server):
    client = tiny_server.client()
    texts = {
        client.completions.create(model="tiny", prompt="Seeded", max_tokens=16, seed=seed, temperature=1.0).choices[0].text
        for seed in (7, 7, 8)
    }
    assert len(texts) == 2  # 7 twice gives one text, 8 another


def test_n_gives_distinct_choices(tiny_server):
    reply = tiny_server.client().chat.completions.create(model="tiny", messages=FRANCE, n=2, max_tokens=8, seed=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    assert reply.usage.completion_tokens == 2 * 8


def test_n_streams_every_choice(tiny_server):
    stream = tiny_server.client().completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=4, stream=True)
    finished = {c.choices[0].index for c in stream if c.choices[0].finish_reason}
    assert finished == {0, 1, 2, 3}


def test_list_models_names_the_served_model(tiny_server):
    assert [m.id for m in tiny_server.client().models.list()] == ["tiny"]


def test_response_names_the_deployment(tiny_server):
    raw = tiny_server.client().chat.completions.with_raw_response.create(model="tiny", messages=FRANCE, max_tokens=2)
    assert raw.headers["x-baton-deployment"] == "tiny"


def test_disconnect_mid_stream_frees_the_batch_slot(tiny_server):
    before = _engine_health(tiny_server)["details"]["num_aborted"]
    body = {"model": "tiny", "prompt": "Go on and on", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{tiny_server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert _engine_health(tiny_server)["num_running"] == 1
    # the connection is closed; 4000 tokens would take far longer than this to finish
    assert _wait_for(lambda: _engine_health(tiny_server)["num_running"] == 0, seconds=5)
    assert _engine_health(tiny_server)["details"]["num_aborted"] == before + 1


def test_health_reports_ready(tiny_server):
    response = httpx.get(f"{tiny_server.url}/health")
    assert response.status_code == 200
    assert response.json()["models"]["tiny"]["is_ready"] is True


def _engine_health(server) -> dict:
    return httpx.get(f"{server.url}/health").json()["models"]["tiny"]


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_huge_prompt_is_tokenized_off_the_event_loop(tiny_server):
    """Near the body limit, a prompt takes a second or more to render and tokenize (it is
    then refused as too long); meanwhile the server answers others at once."""
    from concurrent.futures import ThreadPoolExecutor

    text = "hello world, this is a prompt. " * (tiny_server.settings.max_body_bytes // 32 - 64)
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 1}

    def huge() -> tuple[int, float]:
        started = time.perf_counter()
        response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=120)
        return response.status_code, time.perf_counter() - started

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(huge)
        time.sleep(0.3)  # the body is sent and being tokenized
        started = time.perf_counter()
        assert httpx.get(f"{tiny_server.url}/health", timeout=120).status_code == 200
        health_s = time.perf_counter() - started
        status, huge_s = pending.result()
    assert status == 400  # longer than the model's context
    assert huge_s > 0.45 and health_s < huge_s / 3, (health_s, huge_s)  # inline, health waits about huge_s - 0.3
