"""Swaps on a GPU node with vLLM, for real: reload under load, rollback through a sleeping
standby, the memory plan's blue-green and its 409, memory back after stop. Skipped without
CUDA and vLLM (CI has neither); on a GPU machine run `.venv/bin/python -m pytest tests/gpu -s`
(see the README's "GPU test loop"). Models have random weights, built here: nothing is
downloaded. Timings are printed, not asserted (benchmarks/ checks targets)."""

from __future__ import annotations

import time

import httpx
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("vllm.v1.engine.async_llm", reason="vLLM is not installed")

from models.catalog import Change  # noqa: E402
from models.registry import ImportOptions, Registry  # noqa: E402
from server.config import ModelSpec, Settings  # noqa: E402
from server.devices import gpu_memory  # noqa: E402
from tests.conftest import ServerThread, build_tiny_model, streaming_versions_during  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# SmolLM2-135M's shape (random weights), and a 1B-class Llama of the same family.
SMOL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, initializer_range=0.02)
ONE_B_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, initializer_range=0.02)
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory, demo_model_path):
    """smol@1, smol@2 (one layout, other weights) and big@1 (another layout, about 1B)."""
    home = tmp_path_factory.mktemp("gpu")
    registry = Registry(home)
    for name, shape, seeds in (("smol", SMOL_SHAPE, (0, 1)), ("big", ONE_B_SHAPE, (0,))):
        for seed in seeds:
            folder = build_tiny_model(tmp_path_factory.mktemp(f"{name}{seed}") / "model", demo_model_path, seed=seed, **shape)
            registry.import_folder(folder, name, {"kind": "local"}, ImportOptions(engine_options={"engine": "vllm", "max_model_len": 2048}), Change("gpu-test"))
    return home


def _server(home, **settings) -> ServerThread:
    version = Registry(home).resolve("smol@1")
    return ServerThread(Settings(home=home, models=[ModelSpec(name="chat", path=version.path, version=version.ref)], **settings))


def _swap(server, expect: int = 200, **body) -> dict:
    response = httpx.post(f"{server.url}/admin/deployments/chat/swap", json=body, timeout=900)
    assert response.status_code == expect, response.text
    return response.json()


def _under_load(server, action) -> tuple[object, list[str], list[Exception]]:
    """Run `action` while 8 clients stream; returns its result, the versions that served, the errors."""
    return streaming_versions_during(server, "chat", HELLO, action, num_clients=8, settle_s=2.0)


def _held_seconds(record: dict) -> float:
    """From the hold (the drain) to the flip."""
    names = [p["name"] for p in record["phases"]]
    return sum(p["duration_s"] for p in record["phases"][names.index("drain") : names.index("flip") + 1])


def test_reload_under_streaming_load_fails_nothing(home):
    with _server(home) as server:
        record, versions, errors = _under_load(server, lambda: _swap(server, to="smol@2"))
        assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
        assert errors == [] and {"smol@1", "smol@2"} <= set(versions)
        print(f"\nreload under load: new requests held {_held_seconds(record):.3f} s; phases {record['phases']}")
        active = httpx.get(f"{server.url}/admin/status").json()["deployments"][0]["active"]
        assert active["memory_plan"].startswith("gpu_memory_utilization")  # the engine's GPU memory, as planned


def test_rollback_through_a_sleeping_standby(home):
    with _server(home) as server:
        replaced = _swap(server, to="big@1", strategy="replace")
        assert replaced["phases"][1]["detail"].startswith("asleep on standby"), replaced
        started = time.perf_counter()
        back = httpx.post(f"{server.url}/admin/deployments/chat/rollback", json={}, timeout=900).json()
        print(f"\nrollback through standby: {time.perf_counter() - started:.2f} s; phases {back['phases']}")
        assert (back["status"], back["strategy"]) == ("succeeded", "standby"), back


def test_blue_green_when_the_plan_leaves_room_and_409_when_it_does_not(home):
    with _server(home) as server:  # one engine takes what is free
        refused = _swap(server, expect=409, to="big@1", strategy="blue-green")["error"]
        assert "memory budget has" in refused["message"]
    with _server(home, gpu_room_for_blue_green=True) as server:
        record, versions, errors = _under_load(server, lambda: _swap(server, to="big@1", strategy="blue-green"))
        assert record["status"] == "succeeded" and errors == []


def test_memory_comes_back_after_stop(home):
    free_before = gpu_memory()[0].free_bytes
    with _server(home):
        assert gpu_memory()[0].free_bytes < free_before - (1 << 30)
    deadline = time.monotonic() + 60
    while gpu_memory()[0].free_bytes < free_before - (1 << 30):
        assert time.monotonic() < deadline, "the engine's GPU memory did not come back"
        time.sleep(1)
