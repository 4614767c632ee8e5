"""Every bad input gets its status code and an OpenAI-shaped error body."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread

HI = [{"role": "user", "content": "hi"}]


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": HI, **fields}


UNCOMPILABLE_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Value error" not in error["message"]  # pydantic's prefix, not for callers
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat(temperature=2.5), "temperature"),
        (_chat(temperature=-0.1), "temperature"),
        (_chat(top_p=0), "top_p"),
        (_chat(max_tokens=0), "max_tokens"),
        (_chat(max_completion_tokens=0), "max_completion_tokens"),
        (_chat(n=0), "n"),
        (_chat(n=99), "n"),
        (_chat(seed=2**64), "seed"),
        (_chat(seed=-(2**63) - 1), "seed"),
        (_chat(seed=2**63 - 1, n=2), "seed"),  # choice 1 would use seed + 1
        (_chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (_chat(stop=["a", ""]), "stop"),
        (_chat(stop=["x" * 1025]), "stop"),
        (_chat(stop=["\ud800"]), "stop"),  # a lone surrogate: vLLM could not send it to its engine
        (_chat(stream_options={"include_usage": True}), "stream_options"),  # without stream
        (_chat(continue_final_message=True), "continue_final_message"),  # beside add_generation_prompt
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content.0.type"),
        ({"model": "tiny", "messages": [*HI, {"role": "tool", "tool_call_id": "call_1", "content": "5 degrees"}]}, "messages"),  # answers no call
        ({"messages": HI}, "model"),
        ({"model": "tiny", "messages": [{"role": "user", "content": None}]}, "messages.0"),
        ({"model": "tiny", "messages": [{"role": "user"}]}, "messages.0"),
        ({"model": "tiny", "messages": [*HI, {"role": "assistant", "content": None}]}, "messages.1"),  # null only beside tool_calls
        (_chat(tools=[{"type": "function"}]), "tools.0.function"),
        (_chat(logit_bias={"one": 5}), "logit_bias"),
        (_chat(logit_bias={"1": 101}), "logit_bias"),
        (_chat(logit_bias={"999999": 5}), "logit_bias"),  # not in the vocabulary
        (_chat(logit_bias={str(token): -1 for token in range(1025)}), "logit_bias"),  # more than 1,024
        (_chat(presence_penalty=2.5), "presence_penalty"),
        (_chat(top_logprobs=21, logprobs=True), "top_logprobs"),
        (_chat(top_logprobs=2), "top_logprobs"),  # needs logprobs: true
        (_chat(response_format={"type": "xml"}), "response_format.type"),
        (_chat(response_format=UNCOMPILABLE_SCHEMA), "response_format"),  # valid JSON Schema; no grammar has look-behind
        (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}), "response_format"),  # not enforced
    ],
)
def test_invalid_values_get_400_naming_the_field(tiny_server, body, param):
    sent = json.dumps(body).encode()  # ASCII, as most clients send it: a lone surrogate travels as an escape
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", content=sent, headers={"content-type": "application/json"})
    error = _assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([], "cannot be empty"),
        ([[]], "cannot be empty"),
        (["a", [1, 2]], "a list of strings, a list of token ids"),
        ([-1, 5], "Token id -1 in prompt"),
        ([[5], [10**9]], "Token id 1000000000 in prompt"),
        ({"text": "hi"}, "a list of strings, a list of token ids"),
    ],
)
def test_a_completion_prompt_of_the_wrong_shape_is_a_400_naming_prompt(tiny_server, prompt, words):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert words in _assert_openai_error(response, 400, "prompt")["message"]


def test_a_completion_asking_for_more_than_64_generations_is_a_400(tiny_server):
    url = f"{tiny_server.url}/v1/completions"
    refused = httpx.post(url, json={"model": "tiny", "prompt": ["hi"] * 9, "n": 8, "max_tokens": 1})
    assert "72 generations (9 prompt(s) x n=8); at most 64" in _assert_openai_error(refused, 400, "prompt")["message"]
    assert httpx.post(url, json={"model": "tiny", "prompt": ["hi"] * 8, "n": 8, "max_tokens": 1}, timeout=120).status_code == 200


def test_unimplemented_field_is_named_in_the_message(tiny_server):
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=_chat(audio={"voice": "alloy"}))
    assert "audio" in _assert_openai_error(response, 400, "audio")["message"]


def test_harmless_fields_are_accepted(tiny_server):
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=_chat(user="u1", metadata={"k": "v"}, max_tokens=2))
    assert response.status_code == 200


def test_values_that_ask_for_nothing_are_accepted(tiny_server):
    """What SDKs and frameworks send as their defaults."""
    neutral = dict(
        logprobs=False,
        tools=None,
        tool_choice="none",
        parallel_tool_calls=None,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        response_format={"type": "text"},
        stream=True,
        stream_options={"include_usage": None},
        modalities=["text"],
        service_tier="auto",
        max_tokens=2,
    )
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=_chat(**neutral))
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]"), response.text
    completion = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "echo": False, "best_of": 1, "logprobs": None, "max_tokens": 2})
    assert completion.status_code == 200, completion.text
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "stop", "seed", "store"))
    answer = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=_chat(**nulls, max_tokens=2))  # null: the default, as OpenAI reads it
    assert answer.status_code == 200 and len(answer.json()["choices"]) == 1, answer.text
    completion = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "echo": None, "n": None, "max_tokens": 2})
    assert completion.status_code == 200, completion.text
    stored = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=_chat(store=True, max_tokens=2))  # kept (test_stored_completions.py)
    assert stored.status_code == 200 and httpx.get(f"{tiny_server.url}/v1/chat/completions/{stored.json()['id']}").status_code == 200
    spoken = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=_chat(modalities=["text", "audio"], max_tokens=2))
    _assert_openai_error(spoken, 400, "modalities.1")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}', "messages"),
        ("completions", '{"model": "tiny", "prompt": "\\udfff", "max_tokens": 2}', "prompt"),
    ],
)
def test_a_lone_surrogate_escape_is_a_400_not_a_tokenizer_crash(tiny_server, path, body, param):
    response = httpx.post(f"{tiny_server.url}/v1/{path}", content=body.encode(), headers={"content-type": "application/json"})
    assert "surrogate" in _assert_openai_error(response, 400, param)["message"]
    unknown = httpx.post(f"{tiny_server.url}/v1/{path}", content=body.replace('"tiny"', '"\\udc80"').encode(), headers={"content-type": "application/json"})
    assert _assert_openai_error(unknown, 404, "model")["message"].startswith("The model '\udc80' does not exist")  # quoted back, as JSON can
    paired = body.replace("\\ud800", "\\ud83d\\ude00").replace("\\udfff", "\\ud83d\\ude00")  # an emoji, as JSON escapes it
    assert httpx.post(f"{tiny_server.url}/v1/{path}", content=paired.encode(), headers={"content-type": "application/json"}).status_code == 200


def test_malformed_json_gets_400(tiny_server):
    response = httpx.post(
        f"{tiny_server.url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
    )
    assert _assert_openai_error(response, 400)["code"] == "invalid_json"
    empty = httpx.post(f"{tiny_server.url}/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
    assert _assert_openai_error(empty, 400)["message"] == "The request has no body; send a JSON object."


def test_prompt_longer_than_the_context_names_the_token_counts(tiny_server):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": " ".join(["hello"] * 5000)})
    error = _assert_openai_error(response, 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert "4096 tokens" in error["message"] and "5000 tokens" in error["message"]


def test_max_tokens_beyond_the_context_names_the_token_counts(tiny_server):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 5000})
    error = _assert_openai_error(response, 400, "max_tokens")
    assert "5001" in error["message"] and "4096" in error["message"]


def test_unknown_model_gets_404_listing_known_ones(tiny_server):
    with pytest.raises(openai.NotFoundError) as raised:
        tiny_server.client().chat.completions.create(model="nope", messages=HI)
    assert "tiny" in raised.value.body["message"]
    assert raised.value.body["code"] == "model_not_found"


def test_oversized_body_gets_413(tiny_server):
    body = {"model": "tiny", "prompt": "x" * (tiny_server.settings.max_body_bytes + 1)}
    _assert_openai_error(httpx.post(f"{tiny_server.url}/v1/completions", json=body), 413)


def test_oversized_chunked_body_gets_413(tiny_server):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(tiny_server.settings.max_body_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(f"{tiny_server.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _assert_openai_error(response, 413)


def test_wrong_method_gets_405(tiny_server):
    _assert_openai_error(httpx.get(f"{tiny_server.url}/v1/completions"), 405)  # GET /v1/chat/completions lists stored ones


def test_unknown_path_gets_404(tiny_server):
    _assert_openai_error(httpx.get(f"{tiny_server.url}/v1/nothing-here"), 404)


def test_api_key_is_required_when_configured(tiny_model_path, tmp_path):
    settings = Settings(home=tmp_path, api_key="s3cret", models=[ModelSpec(name="tiny", path=tiny_model_path, engine="transformers")])
    with ServerThread(settings) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert [m.id for m in server.client().models.list()] == ["tiny"]
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_inputs_that_once_failed_a_whole_batch_now_run_beside_good_requests(tiny_server):
    """An empty completion prompt starts from BOS; a vanishing temperature is greedy. Sent
    while good streams decode, every request answers 200 and the good ones finish."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{tiny_server.url}/v1"
    good = {"model": "tiny", "messages": HI, "max_tokens": 40, "temperature": 0}
    odd = [
        ("completions", {"model": "tiny", "prompt": "", "max_tokens": 3}),
        ("chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 5, "temperature": 1e-40}),
        ("chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 5, "temperature": 0}),
    ]
    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(httpx.post, f"{url}/chat/completions", json=good, timeout=60) for _ in range(4)]
        odds = [pool.submit(httpx.post, f"{url}/{route}", json=body, timeout=60) for route, body in odd]
        good_texts = {f.result().json()["choices"][0]["message"]["content"] for f in goods}
        empty, tiny_temperature, greedy = [f.result() for f in odds]
    assert len(good_texts) == 1  # all finished, all the same greedy text
    assert empty.status_code == 200 and empty.json()["usage"]["prompt_tokens"] == 1
    assert tiny_temperature.status_code == 200
    assert tiny_temperature.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


def test_a_non_streaming_request_whose_client_leaves_stops_generating(tiny_model_path, tmp_path):
    from tests.fake_engine import FakeBehaviour, FakeEngineFactory

    slow = FakeEngineFactory(default=FakeBehaviour(token_seconds=0.05))
    settings = Settings(home=tmp_path, models=[ModelSpec(name="tiny", path=tiny_model_path)])
    with ServerThread(settings, engine_factory=slow) as server:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 500 tokens
            httpx.post(f"{server.url}/v1/chat/completions", json=_chat(max_tokens=500), timeout=0.5)
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/health").json()["models"]["tiny"]["num_running"]:
            assert time.monotonic() < deadline, "the abandoned generation kept running"
            time.sleep(0.1)


def test_a_lone_surrogate_in_what_the_admin_api_keeps_is_a_400_and_nothing_changes(tmp_path, tiny_model_path):
    """Reasons go to the registry's history (SQLite), notes and labels into a manifest every
    listing sends as JSON, prompts to a tokenizer at each swap or health check: text that is
    no Unicode is refused at the door, naming its field, and the registry is as it was."""
    from models.catalog import Change
    from models.registry import ImportOptions, Registry

    registry = Registry(tmp_path / "home")
    version, _ = registry.import_folder(tiny_model_path, "tiny", {"kind": "local"}, ImportOptions(), Change("tester"))
    settings = Settings(home=tmp_path / "home", import_roots=[tiny_model_path.parent], models=[ModelSpec(name="tiny", path=version.path, version=version.ref, engine="transformers")])
    calls = [
        ("/admin/models/tiny/aliases", '{"version": "1", "alias": "prod", "reason": "\\ud800"}', "reason"),
        ("/admin/models", '{"source": "%s", "name": "other", "notes": "\\udfff"}' % tiny_model_path, "notes"),
        ("/admin/models", '{"source": "%s", "name": "other", "labels": {"team": "\\ud800"}}' % tiny_model_path, "labels"),
        ("/admin/deployments", '{"name": "second", "model": "tiny@1", "smoke_prompts": ["\\ud800"]}', "smoke_prompts.0"),
        ("/admin/deployments", '{"name": "second", "model": "tiny@1", "health": {"golden_prompts": [{"prompt": "\\ud800", "expect": "x"}]}}', "health.golden_prompts.0.prompt"),
        ("/admin/deployments/tiny/swap", '{"to": "tiny@1", "strategy": "auto", "reason": "\\udc80"}', "reason"),
    ]
    with ServerThread(settings) as server:
        for path, body, param in calls:
            response = httpx.post(f"{server.url}{path}", content=body.encode(), headers={"content-type": "application/json"}, timeout=120)
            _assert_openai_error(response, 400, param)
        assert [d["name"] for d in httpx.get(f"{server.url}/admin/deployments").json()] == ["tiny"]
        assert [m["ref"] for m in httpx.get(f"{server.url}/admin/models").json()] == ["tiny@1"]
        assert [entry["action"] for entry in httpx.get(f"{server.url}/admin/models/tiny/history").json()] == ["register"]
