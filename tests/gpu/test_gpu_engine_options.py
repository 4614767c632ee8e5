"""vLLM's speed options on a GPU node, for real: speculative decoding by prompt lookup, an fp8
KV cache and priority scheduling together, on SmolLM2's layout with random weights (built
here). Skipped without CUDA and vLLM; `bash tests/gpu/run_on_node.sh options` runs it alone.
It checks that vLLM 0.26 (its V2 model runner, the default for dense models) starts with
them and answers; their speed needs a real model (random weights accept no guess):
benchmarks/speculative.py."""

from __future__ import annotations

import httpx
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("vllm.v1.engine.async_llm", reason="vLLM is not installed")

from server.config.settings import ModelSpec, Settings  # noqa: E402
from benchmarks.random_model import build_random_llama  # noqa: E402
from tests.conftest import ServerThread  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

OPTIONS = {
    "max_model_len": 2048,
    "max_num_seqs": 32,
    "enforce_eager": True,  # starts in about 40 s instead of 70: only whether they run is asked here
    "speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
    "kv_cache_dtype": "fp8",
    "scheduling_policy": "priority",
}


def test_speculation_fp8_kv_cache_and_priorities_start_and_answer(tmp_path, tokenizer_source):
    model = build_random_llama(tmp_path / "model", tokenizer_source, 0, "bfloat16", "smol")
    spec = ModelSpec(name="chat", path=model, engine="vllm", engine_options=OPTIONS)
    with ServerThread(Settings(home=tmp_path / "home", models=[spec], restore_state=False)) as server:
        for priority in (0, 5):
            body = {"model": "chat", "messages": [{"role": "user", "content": "Repeat: a b c a b c a b c"}], "max_tokens": 32, "temperature": 0, "priority": priority}
            answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] > 0
