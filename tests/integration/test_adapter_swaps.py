"""Unmerged LoRA adapters behind a name, through a real server and the admin API, with fake
engines standing in for vLLM's multi-LoRA (tests/vllm/test_vllm_lora.py runs the real one):
the base and its adapters share one engine, so where the memory budget holds one engine only,
a swap among them is still blue-green (nothing waits), the standby and a canary cost nothing,
and the budget counts the engine once. An adapter the engine refuses fails its swap alone. The
registry keeps an unmerged adapter as the base's files plus its own, and refuses what a merge
would refuse; the transformers engine (no multi-LoRA) merges it as it loads."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from models.catalog import Change
from models.errors import InvalidRequestError
from models.importers import import_source
from models.lora import ADAPTER_CONFIG, ADAPTER_FOLDER, ADAPTER_WEIGHTS, merge_lora
from models.registry import ImportOptions, Registry
from server.config.settings import ModelSpec, Settings
from server.engines.factory import LOAD_OVERHEAD
from tests.conftest import ServerThread, build_tiny_model
from tests.integration.test_lora_swap import _greedy_ids
from tests.fake_engine import FakeBehaviour, FakeEngineFactory
from tests.unit.test_lora import write_adapter

ON_VLLM = {"engine": "vllm", "max_loras": 2}


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_path) -> Path:
    """chat@1 the base (on vLLM, LoRA on); chat@2 and chat@3 adapters of it, imported unmerged."""
    root = tmp_path_factory.mktemp("adapters")
    registry = Registry(root / "home")
    registry.import_folder(tiny_model_path, "chat", {"kind": "local"}, ImportOptions(engine_options=ON_VLLM), Change("tester"))
    for seed in (0, 1):
        adapter = write_adapter(root / f"adapter{seed}", tiny_model_path, seed=seed)
        import_source(registry, str(adapter), "chat", ImportOptions(base="chat@1", merge=False), Change("tester"))
    return root / "home"


def _server(home: Path, factory: FakeEngineFactory, engines_in_budget: float = 1.5, **settings) -> ServerThread:
    base = Registry(home).resolve("chat@1")
    one_engine = int(base.manifest.total_bytes * LOAD_OVERHEAD) + 2**30  # vLLM on CPU: its weights and a 1 GiB KV cache
    spec = ModelSpec(name="chat", path=base.path, version=base.ref, engine="vllm")
    budget = int(one_engine * engines_in_budget)
    return ServerThread(Settings(home=home, models=[spec], restore_state=False, memory_budget_bytes=budget, **settings), engine_factory=factory)


def _swap(server, expect: int = 200, **body) -> dict:
    response = httpx.post(f"{server.url}/admin/deployments/chat/swap", json=body, timeout=60)
    assert response.status_code == expect, response.text
    return response.json()


def _served(server, user: str = "") -> tuple[str, str]:
    raw = server.client().chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user=user)
    return raw.headers["x-baton-version"], raw.parse().choices[0].message.content.strip()


def test_the_registry_keeps_an_unmerged_adapter_beside_the_base_files(home, tiny_model_path):
    registry = Registry(home)
    base, adapter = registry.resolve("chat@1"), registry.resolve("chat@2")
    assert adapter.manifest.source["kind"] == "lora-unmerged" and adapter.manifest.source["base"] == "chat@1"
    assert {f.path for f in adapter.manifest.files} == {f.path for f in base.manifest.files} | {f"{ADAPTER_FOLDER}/{ADAPTER_CONFIG}", f"{ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}"}
    assert adapter.adapter == adapter.path / ADAPTER_FOLDER and (adapter.adapter / ADAPTER_WEIGHTS).is_file() and base.adapter is None
    assert adapter.weights_digest == base.weights_digest == base.manifest.digest != adapter.manifest.digest
    assert adapter.manifest.engine_options == ON_VLLM  # the base's
    again, is_new = import_source(registry, str(home.parent / "adapter0"), "chat", ImportOptions(base="chat@1", merge=False), Change("tester"))
    assert (again.ref, is_new) == ("chat@2", False)


def test_an_unmerged_import_refuses_what_does_not_fit_its_base(home, tmp_path, demo_model_path):
    registry = Registry(home)
    other = build_tiny_model(tmp_path / "other", demo_model_path, hidden_size=128)
    with pytest.raises(InvalidRequestError, match="trained on another model"):
        import_source(registry, str(write_adapter(tmp_path / "other-adapter", other)), "chat", ImportOptions(base="chat@1", merge=False), Change("tester"))
    dora = write_adapter(tmp_path / "dora", registry.resolve("chat@1").path, use_dora=True)
    with pytest.raises(InvalidRequestError, match="DoRA"):
        import_source(registry, str(dora), "chat", ImportOptions(base="chat@1", merge=False), Change("tester"))
    with pytest.raises(InvalidRequestError, match="itself an unmerged adapter"):
        import_source(registry, str(home.parent / "adapter1"), "chat", ImportOptions(base="chat@2", merge=False), Change("tester"))
    assert [v.ref for v in registry.versions("chat")] == ["chat@1", "chat@2", "chat@3"]  # nothing half-written


def test_adapters_swap_blue_green_in_one_engine_where_two_engines_do_not_fit(home):
    factory = FakeEngineFactory()
    with _server(home, factory) as server:
        one_engine = httpx.get(f"{server.url}/admin/status").json()["memory_in_use_bytes"]
        plan = _swap(server, to="chat@2", dry_run=True)
        assert (plan["strategy"], plan["requests_wait"], plan["needed_bytes"]) == ("blue-green", False, 0), plan
        record = _swap(server, to="chat@2")
        assert (record["status"], record["strategy"]) == ("succeeded", "blue-green") and "shares the running engine" in record["strategy_reason"]
        assert _served(server) == ("chat@2", "chat@2 chat@2")  # the engine's words name the adapter that served
        assert _swap(server, to="chat@3")["strategy"] == "blue-green"
        described = httpx.get(f"{server.url}/admin/deployments/chat").json()
        assert (described["active"]["version"], described["standby"]["version"]) == ("chat@3", "chat@2")
        assert described["active"]["lora_adapter_of"] == "chat@1" and described["active"]["shared_engine"] == described["standby"]["shared_engine"]
        card = server.client().models.retrieve("chat")
        assert (card.root, card.parent) == ("chat@3", "chat@1")  # vLLM's card for a LoRA adapter
        canary = httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@1", "weight": 50}, timeout=60)
        assert canary.status_code == 200, canary.text  # the base beside its adapter: no second engine
        assert {_served(server, user=f"u{n}")[0] for n in range(16)} == {"chat@1", "chat@3"}
        slots = [described["active"], described["standby"], httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"]]
        in_use = httpx.get(f"{server.url}/admin/status").json()["memory_in_use_bytes"]
        assert in_use == max(slot["memory_bytes"] for slot in slots) < one_engine * 1.01  # the engine once (adapters add their files)
        assert [engine.start_began_at is not None for engine in factory.built].count(True) == 1
        assert factory.built[0].adapters.keys() == {Registry(home).resolve(ref).adapter for ref in ("chat@2", "chat@3")}


def test_an_adapter_the_engine_refuses_fails_its_swap_and_the_base_serves_on(home):
    with _server(home, FakeEngineFactory(default=FakeBehaviour(refuses_adapters=True))) as server:
        response = httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@2"}, timeout=60)
        assert response.status_code == 500 and "cannot take the adapter of chat@2" in response.json()["error"]["message"], response.text
        assert _served(server)[0] == "chat@1"


def test_the_transformers_engine_serves_an_unmerged_adapter_merged_and_swaps_to_it_by_reload(home, tiny_model_path):
    """Real engine and weights: an engine without multi-LoRA merges the adapter as it loads, so
    the unmerged version answers as the merged model, and a swap from its base reloads."""
    base = Registry(home).resolve("chat@1")
    spec = ModelSpec(name="chat", path=base.path, version=base.ref, engine="transformers")
    with ServerThread(Settings(home=home, models=[spec], restore_state=False)) as server:
        prompt = AutoTokenizer.from_pretrained(tiny_model_path).encode("The sea is")
        ask = lambda: server.client().completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].text  # noqa: E731
        before = ask()
        record = _swap(server, to="chat@2")
        assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
        merged = merge_lora(home.parent / "adapter0", tiny_model_path, home.parent / "merged0")
        assert ask() == AutoTokenizer.from_pretrained(merged).decode(_greedy_ids(merged, prompt, 8)) != before
        assert _swap(server, to="chat@1")["strategy"] == "reload" and ask() == before  # the adapter's update taken out again


def test_deployments_of_adapters_of_one_base_share_its_engine_and_leave_it_running(home):
    """Many names, one engine (vLLM's multi-LoRA serving): another deployment of an adapter
    joins the running engine; undeployed, its adapter unloads and the engine serves on."""
    factory = FakeEngineFactory()
    with _server(home, factory) as server:
        deployed = httpx.post(f"{server.url}/admin/deployments", json={"name": "other", "model": "chat@3"}, timeout=60)
        assert deployed.status_code == 201, deployed.text
        on_demand = httpx.post(f"{server.url}/admin/deployments", json={"name": "lazy", "model": "chat@2", "on_demand": True}, timeout=60)
        assert on_demand.status_code == 201, on_demand.text
        assert server.client().chat.completions.create(model="lazy", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices[0].message.content.strip() == "chat@2 chat@2"
        assert server.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices[0].message.content.strip() == "chat@3 chat@3"
        assert [engine.start_began_at is not None for engine in factory.built].count(True) == 1
        assert httpx.delete(f"{server.url}/admin/deployments/other", timeout=60).status_code == 200
        assert factory.built[0].adapters.keys() == {Registry(home).resolve("chat@2").adapter} and factory.built[0].stopped_at is None
        label = Registry(home).resolve("chat@1").path.name[:8]  # the fake engine's words: its folder's name, no adapter
        assert _served(server) == ("chat@1", f"{label} {label}")


def test_deployments_on_an_engine_that_dies_all_come_back_on_one_fresh_engine(home):
    factory = FakeEngineFactory()
    with _server(home, factory, idle_check_s=0.1) as server:
        assert httpx.post(f"{server.url}/admin/deployments", json={"name": "other", "model": "chat@3"}, timeout=60).status_code == 201
        factory.built[0].die()

        def both_serve() -> bool:
            states = {d["name"]: d["state"] for d in httpx.get(f"{server.url}/admin/deployments").json()}
            return len(factory.built) >= 3 and set(states.values()) == {"ready"}

        deadline = time.monotonic() + 30
        while not both_serve():
            assert time.monotonic() < deadline, httpx.get(f"{server.url}/admin/status").json()
            time.sleep(0.1)
        assert _served(server)[0] == "chat@1"
        assert server.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}], max_tokens=1).choices[0].message.content.strip() == "chat@3"
        started = [engine for engine in factory.built if engine.start_began_at is not None]
        assert len(started) == 2 and started[0].stopped_at is not None and started[1].stopped_at is None  # the dead one, then one fresh engine for both


def test_a_shared_engine_left_with_one_version_sleeps_on_standby_and_a_swap_back_wakes_it(home):
    """As vLLM on a GPU: swapped away from (other engine options, so another engine), the
    base's engine sleeps with its one version on standby, and a swap back is a wake."""
    factory = FakeEngineFactory(default=FakeBehaviour(sleeps=True))
    with _server(home, factory) as server:
        away = _swap(server, to="chat@1", engine_options={**ON_VLLM, "max_num_seqs": 8}, strategy="replace")
        assert away["status"] == "succeeded" and factory.built[0].is_asleep
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["standby"]["state"] == "asleep"
        back = _swap(server, to="chat@1", engine_options={"engine": "vllm"})  # the options it had: on standby
        assert (back["status"], back["strategy"]) == ("succeeded", "standby") and not factory.built[0].is_asleep
        label = Registry(home).resolve("chat@1").path.name[:8]
        assert _served(server) == ("chat@1", f"{label} {label}")
        assert [engine.start_began_at is not None for engine in factory.built].count(True) == 2  # no third start


def test_a_version_that_joins_a_sleeping_shared_engine_wakes_it_and_starts_none(home):
    factory = FakeEngineFactory(default=FakeBehaviour(sleeps=True))
    with _server(home, factory, engines_in_budget=3) as server:
        _swap(server, to="chat@1", engine_options={**ON_VLLM, "max_num_seqs": 8}, strategy="replace")
        assert factory.built[0].is_asleep  # the base's engine, its one version on standby
        joined = _swap(server, to="chat@2", engine_options={"engine": "vllm"})  # the sleeping engine's options
        assert (joined["status"], joined["strategy"]) == ("succeeded", "blue-green") and not factory.built[0].is_asleep
        assert _served(server) == ("chat@2", "chat@2 chat@2")
        assert [engine.start_began_at is not None for engine in factory.built].count(True) == 2
        assert 'baton_engine_starts_total{engine="fake",outcome="started"} 2.0' in httpx.get(f"{server.url}/metrics").text
