"""A version's generation_config.json sampling defaults and vLLM's sampling fields, through
a real server (transformers engine, SmolLM2) and the openai client: defaults apply where a
request is silent, switch with the version in a reload swap, and a request's own win."""

from __future__ import annotations


import httpx
import pytest

from models.catalog import Change
from models.registry import ImportOptions, Registry
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread, copy_with

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# chat@2's authors ask for a hot temperature, but only the best token, and short answers
CHAT2_DEFAULTS = {"temperature": 1.3, "top_k": 1, "max_new_tokens": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_path):
    """chat@1: SmolLM2 as it ships (no sampling defaults); chat@2: the same weights with CHAT2_DEFAULTS."""
    home = tmp_path_factory.mktemp("home")
    registry = Registry(home)
    second = copy_with(demo_model_path, tmp_path_factory.mktemp("second") / "model", generation_config=CHAT2_DEFAULTS)
    for folder in (demo_model_path, second):
        registry.import_folder(folder, "chat", {"kind": "local"}, ImportOptions(), Change("tester"))
    spec = ModelSpec(name="chat", path=registry.resolve("chat@1").path, version="chat@1", engine="transformers")
    with ServerThread(Settings(home=home, models=[spec], keep_standby=False)) as running:
        yield running


def _swap(server, to: str) -> dict:
    return httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": to}, timeout=300).json()


def test_a_versions_defaults_apply_where_a_request_is_silent_and_switch_with_a_reload(server):
    client = server.client()
    ask = lambda **kwargs: client.chat.completions.create(model="chat", messages=FRANCE, **kwargs)  # noqa: E731
    greedy = ask(temperature=0)
    assert greedy.model == "chat@1" and greedy.usage.completion_tokens > 5  # no max_new_tokens: the room
    hot = [ask(temperature=1.3, seed=seed, max_tokens=5).choices[0].message.content for seed in range(6)]
    short_greedy = ask(temperature=0, max_tokens=5).choices[0].message.content
    assert any(answer != short_greedy for answer in hot), "at 1.3 the draws should differ from greedy"

    record = _swap(server, "chat@2")
    assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
    active = httpx.get(f"{server.url}/admin/status").json()["deployments"][0]["active"]
    assert active["sampling_defaults"] == {"temperature": 1.3, "top_k": 1, "max_tokens": 5}

    silent = [ask(seed=seed) for seed in range(6)]  # 1.3 as the version says, but top_k 1: the best token
    assert {answer.model for answer in silent} == {"chat@2"}
    assert {answer.choices[0].message.content for answer in silent} == {short_greedy}
    assert {(answer.usage.completion_tokens, answer.choices[0].finish_reason) for answer in silent} == {(5, "length")}
    # A request's own settings win: top_k 0 (every token) brings the draws back; max_tokens its length.
    own = [ask(seed=seed, extra_body={"top_k": 0}).choices[0].message.content for seed in range(6)]
    assert any(answer != short_greedy for answer in own)
    assert ask(temperature=0, max_tokens=7).usage.completion_tokens == 7
    # A Response names the sampling applied: the version's temperature, the request's top_p.
    response = client.responses.create(model="chat", input="Hi", top_p=0.9)
    assert (response.model, response.temperature, response.top_p) == ("chat@2", 1.3, 0.9)

    assert _swap(server, "chat@1")["status"] == "succeeded"
    assert ask(temperature=0).usage.completion_tokens == greedy.usage.completion_tokens


def test_vllms_sampling_fields_work_through_the_openai_clients_extra_body(server):
    client = server.client()
    completion = lambda **extra: client.completions.create(model="chat", prompt="Once upon a time", max_tokens=6, seed=3, temperature=1.5, extra_body=extra)  # noqa: E731
    best = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=6, temperature=0).choices[0].text
    assert completion(top_k=1).choices[0].text == best
    assert completion(min_p=1.0).choices[0].text == best  # only tokens as likely as the best
    cats = "Write the word cat ten times: cat cat cat"
    plain, penalised = (
        client.completions.create(model="chat", prompt=cats, max_tokens=16, temperature=0, extra_body={"repetition_penalty": penalty}).choices[0].text
        for penalty in (1.0, 1.8)
    )
    assert plain.count("cat") >= 8 and penalised.count("cat") < plain.count("cat") / 2, (plain, penalised)


def test_ignore_eos_and_min_tokens_generate_past_the_models_end(server):
    client = server.client()
    ask = lambda **extra: client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=20, extra_body=extra)  # noqa: E731
    natural = ask()
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 12
    endless = ask(ignore_eos=True)
    assert (endless.choices[0].finish_reason, endless.usage.completion_tokens) == ("length", 20)
    assert endless.choices[0].message.content.startswith(natural.choices[0].message.content)
    longer = ask(min_tokens=12)
    assert longer.usage.completion_tokens >= 12
    # An answer its grammar holds complete before min_tokens ends there: the grammar allows
    # nothing else (it failed with a 500). A choice is complete within a few tokens, whatever
    # the model would write; a free JSON object could outrun min_tokens.
    held = client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=40, extra_body={"min_tokens": 30, "structured_outputs": {"choice": ["Paris", "Lyon"]}})
    assert held.choices[0].message.content in ("Paris", "Lyon") and held.choices[0].finish_reason == "stop" and held.usage.completion_tokens < 30
    refused = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": FRANCE, "max_tokens": 4, "min_tokens": 5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "min_tokens"


def test_vllms_output_fields_stop_tokens_kept_stop_strings_and_special_tokens(server):
    client = server.client()
    ask = lambda **extra: client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=20, extra_body=extra).choices[0]  # noqa: E731
    assert ask().message.content == "The capital of France is Paris."
    (paris,) = httpx.post(f"{server.url}/tokenize", json={"model": "chat", "prompt": " Paris"}).json()["tokens"]
    stopped = ask(stop_token_ids=[paris])
    assert (stopped.message.content, stopped.finish_reason) == ("The capital of France is", "stop")
    assert ask(stop=["France"], include_stop_str_in_output=True).message.content == "The capital of France"
    assert ask(ignore_eos=True, skip_special_tokens=False).message.content.startswith("The capital of France is Paris.<|im_end|>")
    outside = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": FRANCE, "stop_token_ids": [10**9]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "stop_token_ids"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [("top_k", -2, "greater than or equal to -1"), ("min_p", 1.5, "less than or equal to 1"), ("repetition_penalty", 0, "greater than 0"), ("top_k", 1.5, "valid integer")],
)
def test_a_sampling_field_out_of_bounds_is_a_400_naming_it(server, field, value, fragment):
    answer = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": FRANCE, field: value})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == field and fragment in error["message"]
