"""Hot swaps behind a stable name, through a real server, the admin API and the openai client.

Real tiny models prove the request path (no failed request, no mixed versions); the fake
engine drives the timing-sensitive parts (queues, deadlines, concurrent swaps)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from models.catalog import Change
from models.errors import ModelNotFoundError
from models.registry import ImportOptions, Registry
from server.engines.factory import estimate_memory_bytes
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread, build_tiny_model, sse_errors
from tests.fake_engine import FakeBehaviour, FakeEngineFactory

HI = [{"role": "user", "content": "Say something"}]
TRANSFORMERS = ImportOptions(engine_options={"engine": "transformers"})


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_path, demo_model_path) -> Path:
    """A registry with chat@1 and chat@2, two tiny models of one layout with different random
    weights, and chat@3, a third layout (three layers)."""
    home = tmp_path_factory.mktemp("swaps")
    registry = Registry(home)
    second = build_tiny_model(tmp_path_factory.mktemp("v2") / "v2", demo_model_path, seed=1)
    third = build_tiny_model(tmp_path_factory.mktemp("v3") / "v3", demo_model_path, seed=2, num_hidden_layers=3)
    for folder in (tiny_model_path, second, third):
        registry.import_folder(folder, "chat", {"kind": "local"}, TRANSFORMERS, Change("tester"))
    return home


def _server(home: Path, engine_factory=None, **settings) -> ServerThread:
    version = Registry(home).resolve("chat@1")
    spec = ModelSpec(name="chat", path=version.path, version=version.ref, engine="transformers")
    return ServerThread(Settings(home=home, models=[spec], restore_state=False, **settings), engine_factory=engine_factory)


def _estimate(home: Path, ref: str = "chat@1") -> int:
    """What a version holds of the memory budget once loaded: its weights, and its prefix cache at its most."""
    version = Registry(home).resolve(ref)
    return estimate_memory_bytes(version.path, {"engine": "transformers"}, version.manifest.total_bytes)


def _admin(server, method: str, path: str, expect: int = 200, **body) -> dict:
    response = httpx.request(method, f"{server.url}/admin{path}", json=body or None, timeout=120)
    assert response.status_code == expect, response.text
    return response.json()


def _ask(client, max_tokens: int = 12) -> tuple[str, str]:
    """(version that served, streamed text)."""
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=HI, max_tokens=max_tokens, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return raw.headers["x-baton-version"], text


def _label(home: Path, ref: str) -> str:
    return Registry(home).resolve(ref).path.name[:8]


def test_swaps_under_streaming_load_fail_no_request(home):
    with _server(home) as server:
        client = server.client()
        expected = {}
        for ref in ("chat@1", "chat@2"):
            if ref != "chat@1":
                _admin(server, "POST", "/deployments/chat/swap", to=ref)
            version, text = _ask(client)
            expected[version] = text
        assert expected["chat@1"] != expected["chat@2"]
        results, errors, stop = [], [], threading.Event()

        def keep_asking():
            own = server.client()
            while not stop.is_set():
                try:
                    results.append(_ask(own))
                except Exception as error:  # any failure at all is what this test looks for
                    errors.append(error)

        clients = [threading.Thread(target=keep_asking) for _ in range(8)]
        for thread in clients:
            thread.start()
        for i in range(10):
            strategy = "blue-green" if i % 3 == 0 else "auto"
            record = _admin(server, "POST", "/deployments/chat/swap", to="chat@1" if i % 2 == 0 else "chat@2", strategy=strategy)
            assert record["status"] == "succeeded" and record["num_cut_off"] == 0
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert errors == []
    assert len(results) >= 20, len(results)
    assert all(text == expected[version] for version, text in results), "a response was cut or mixed versions"
    assert {version for version, _ in results} == {"chat@1", "chat@2"}


def test_swap_records_phases_and_parks_the_old_version_on_standby(home):
    with _server(home) as server:
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="blue-green", reason="new fine-tune")
        assert [p["name"] for p in record["phases"]] == ["load", "verify", "flip", "drain", "park"]
        assert all(p["duration_s"] >= 0 for p in record["phases"])
        assert _admin(server, "GET", f"/swaps/{record['id']}")["status"] == "succeeded"
        deployment = _admin(server, "GET", "/deployments/chat")
        assert (deployment["version"], deployment["standby"]["version"]) == ("chat@2", "chat@1")
        standby = _admin(server, "POST", "/deployments/chat/swap", to="chat@1", strategy="standby")
        assert [p["name"] for p in standby["phases"]] == ["flip", "drain", "park"]
        assert standby["phases"][0]["duration_s"] < 0.01  # the flip itself
    history = Registry(home).history("chat")
    assert any(e["action"] == "swap" and e["reason"] == "new fine-tune" and e["version"] == 2 for e in history)


def test_rollback_returns_to_the_previous_version(home):
    with _server(home) as server:
        _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="blue-green")
        record = _admin(server, "POST", "/deployments/chat/rollback", reason="bad answers")
        assert (record["to_version"], record["strategy"]) == ("chat@1", "standby")
        assert _ask(server.client())[0] == "chat@1"
    assert any(e["action"] == "rollback" and e["reason"] == "bad answers" for e in Registry(home).history("chat"))


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(home, tmp_path, tiny_model_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_model_path.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    Registry(home).import_folder(broken, "broken", {"kind": "local"}, TRANSFORMERS, Change("tester"))
    with _server(home) as server:
        failure = _admin(server, "POST", "/deployments/chat/swap", expect=500, to="broken@1")["error"]
        assert failure["code"] == "swap_failed" and "chat@1 keeps serving" in failure["message"]
        assert _ask(server.client())[0] == "chat@1"
    assert any(e["action"] == "swap" and e["details"]["status"] == "failed" for e in Registry(home).history("broken"))


def test_canary_splits_traffic_by_weight_then_promotes(home):
    with _server(home) as server:
        _admin(server, "POST", "/deployments/chat/canary", to="chat@2", weight=30)
        client = server.client()
        served = [_ask(client, max_tokens=1)[0] for _ in range(300)]
        share = served.count("chat@2") / len(served)
        assert 0.21 <= share <= 0.39, share  # 30% +- 4.5 standard deviations
        _admin(server, "POST", "/deployments/chat/canary/promote")
        assert {_ask(client, max_tokens=1)[0] for _ in range(10)} == {"chat@2"}


def test_a_canary_keeps_each_user_on_one_version_and_a_step_up_only_moves_users_onto_it(home):
    """Requests naming their `user` (chat, completions, Responses) go by the user: each user
    sees one version all through the canary; users without a name go by weight as before."""
    with _server(home) as server:
        _admin(server, "POST", "/deployments/chat/canary", to="chat@2", weight=30)
        client = server.client()

        def served(user: str) -> set[str]:
            """As `user`, or as OpenAI's newer `safety_identifier`: one user either way."""
            chat = client.chat.completions.with_raw_response.create(model="chat", messages=HI, max_tokens=1, user=user)
            again = client.chat.completions.with_raw_response.create(model="chat", messages=HI, max_tokens=1, safety_identifier=user, prompt_cache_key="c1")
            text = client.completions.with_raw_response.create(model="chat", prompt="hi", max_tokens=1, user=user)
            answer = client.responses.with_raw_response.create(model="chat", input="hi", max_output_tokens=16, safety_identifier=user)
            assert answer.parse().safety_identifier == user
            return {raw.headers["x-baton-version"] for raw in (chat, again, text, answer)}

        users = [f"user-{number}" for number in range(24)]
        at_30 = {user: served(user) for user in users}
        assert all(len(versions) == 1 for versions in at_30.values()), at_30
        on_canary = {user for user, versions in at_30.items() if versions == {"chat@2"}}
        assert 0 < len(on_canary) < len(users)  # 30%: both sides have users (0.7^24 + 0.3^24 by chance)
        _admin(server, "POST", "/deployments/chat/canary/step", weight=70)
        assert on_canary < {user for user in users if served(user) == {"chat@2"}}


def test_failing_verification_keeps_the_old_version(home):
    factory = FakeEngineFactory({Registry(home).resolve("chat@2").path.name: FakeBehaviour(produces_nothing=True)})
    with _server(home, factory) as server:
        failure = _admin(server, "POST", "/deployments/chat/swap", expect=500, to="chat@2", strategy="blue-green")["error"]
        assert "produced no tokens" in failure["message"]
        version, text = _ask(server.client(), max_tokens=3)
        assert version == "chat@1" and text == f"{_label(home, 'chat@1')} " * 3


def test_replace_holds_new_requests_then_serves_them_from_the_new_version(home):
    factory = FakeEngineFactory({Registry(home).resolve("chat@2").path.name: FakeBehaviour(start_seconds=1.0)})
    with _server(home, factory) as server:
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="replace", wait=False)
        assert httpx.get(f"{server.url}/ready").status_code == 200  # held, not failed: still ready
        answers = []
        askers = [threading.Thread(target=lambda: answers.append(_ask(server.client(), max_tokens=2))) for _ in range(4)]
        for thread in askers:
            thread.start()
        for thread in askers:
            thread.join(timeout=30)
        assert [version for version, _ in answers] == ["chat@2"] * 4
        assert _admin(server, "GET", f"/swaps/{record['id']}")["strategy"] == "replace"


@pytest.mark.parametrize("strategy", ["blue-green", "reload"])
def test_drain_deadline_ends_the_rest_with_model_swapped(home, strategy):
    factory = FakeEngineFactory({Registry(home).resolve("chat@1").path.name: FakeBehaviour(token_seconds=0.1)})
    with _server(home, factory, drain_timeout_s=0.5) as server:
        body = {"model": "chat", "messages": HI, "max_tokens": 500, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(lines)  # the stream is under way on chat@1
            record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy=strategy)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert record["num_cut_off"] == 1 and record["status"] == "succeeded"
        assert json.loads(events[-1])["error"]["code"] == "model_swapped"
        assert _ask(server.client(), max_tokens=2) == ("chat@2", f"{_label(home, 'chat@2')} " * 2)


def test_a_second_swap_while_swapping_gets_409(home):
    factory = FakeEngineFactory({Registry(home).resolve("chat@2").path.name: FakeBehaviour(start_seconds=1.0)})
    with _server(home, factory) as server:
        _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="blue-green", wait=False)
        conflict = _admin(server, "POST", "/deployments/chat/swap", expect=409, to="chat@2")
        assert conflict["error"]["code"] == "swap_in_progress"


def test_a_swap_to_the_canarys_version_is_refused_and_promotion_keeps_the_old_version_for_rollback(home):
    with _server(home, FakeEngineFactory()) as server:
        _admin(server, "POST", "/deployments/chat/canary", to="chat@2", weight=10)
        refused = _admin(server, "POST", "/deployments/chat/swap", expect=409, to="chat@2")["error"]["message"]
        assert "canary; promote it" in refused
        _admin(server, "POST", "/deployments/chat/canary/promote")
        deployment = _admin(server, "GET", "/deployments/chat")
        assert (deployment["version"], deployment["standby"]["version"], deployment["previous_version"]) == ("chat@2", "chat@1", "chat@1")
        assert _admin(server, "POST", "/deployments/chat/rollback")["to_version"] == "chat@1"


def test_a_canary_runs_another_version_beside_a_loaded_one(home):
    factory = FakeEngineFactory()
    with _server(home, factory) as server:
        same = _admin(server, "POST", "/deployments/chat/canary", expect=409, to="chat@1", weight=20)
        assert "serves chat@1 already" in same["error"]["message"]
        _admin(server, "POST", "/deployments", expect=201, name="docs", model="chat@1", on_demand=True)
        unloaded = _admin(server, "POST", "/deployments/docs/canary", expect=409, to="chat@2", weight=20)
        assert "no version loaded (on demand)" in unloaded["error"]["message"]
        assert len(factory.built) == 1  # no engine was started for either


def test_canary_abort_routes_everything_back(home):
    with _server(home, FakeEngineFactory()) as server:
        _admin(server, "POST", "/deployments/chat/canary", to="chat@2", weight=50)
        _admin(server, "POST", "/deployments/chat/canary/abort")
        assert {_ask(server.client(), max_tokens=1)[0] for _ in range(20)} == {"chat@1"}
        assert _admin(server, "GET", "/deployments/chat")["canary"] is None


def test_unknown_version_and_strategy_are_clear_errors(home):
    with _server(home, FakeEngineFactory()) as server:
        assert _admin(server, "POST", "/deployments/chat/swap", expect=404, to="chat@9")["error"]["message"].startswith("chat has no version 9")
        assert _admin(server, "POST", "/deployments/chat/swap", expect=400, to="chat@2", strategy="yolo")["error"]["param"] == "strategy"
        unknown = _admin(server, "POST", "/deployments/nope/swap", expect=404, to="chat@2")["error"]
        assert (unknown["code"], unknown["param"]) == ("deployment_not_found", "name") and "No deployment 'nope'. Deployments: chat" in unknown["message"]
        assert _admin(server, "POST", "/deployments/chat/swap", expect=400, to="")["error"]["param"] == "name"
        assert _admin(server, "POST", "/deployments/chat/canary", expect=400, to="", weight=10)["error"]["param"] == "name"
        assert _admin(server, "POST", "/models", expect=400, source="/tmp/a\x00b", name="x")["error"]["param"] == "source"
        for name in ("../x", "Chat", "a b", ""):
            assert _admin(server, "POST", "/deployments", expect=400, name=name, model="chat@2")["error"]["param"] == "name"
        assert _admin(server, "POST", "/deployments", expect=400, name="self", model="chat@2", health={"fallbacks": ["self"]})["error"]["param"] == "health.fallbacks"
        too_small = _admin(server, "POST", "/deployments", expect=400, name="x", model="chat@2", engine_options={"max_batch_size": 0})["error"]
        assert too_small["param"] == "engine_options" and "max_batch_size" in too_small["message"]
        assert [d["name"] for d in _admin(server, "GET", "/deployments")] == ["chat"]
        with pytest.raises(openai.NotFoundError):
            server.client().chat.completions.create(model="nope", messages=HI)


def test_cli_swap_shows_phases_and_deployments_table(home):
    def baton(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli.main", *args], capture_output=True, text=True, timeout=120)

    with _server(home, FakeEngineFactory()) as server:
        remote = ("--server", server.url)
        swapped = baton("swap", "chat", "--to", "chat@2", "--strategy", "blue-green", "--reason", "cli", *remote)
        assert swapped.returncode == 0, swapped.stderr
        for phase in ("load", "verify", "flip", "drain", "park"):
            assert f"  {phase}" in swapped.stdout
        assert "succeeded: chat serves chat@2" in swapped.stdout
        table = baton("deployments", *remote).stdout
        assert "chat@2" in table and "chat@1" in table  # active, and standby
        status = baton("status", *remote)
        assert status.returncode == 0 and "standby  chat@1" in status.stdout and "memory budget:" in status.stdout
        busy = baton("rollback", "chat", *remote)
        assert busy.returncode == 0 and "chat serves chat@1" in busy.stdout
        assert baton("canary", "chat", "--to", "chat@2", "--promote-after", "60", *remote).returncode == 2  # needs --auto
        started = baton("canary", "chat", "--to", "chat@2", "--weight", "20", "--auto", "--promote-after", "600", "--steps", "50,75", *remote)
        assert started.returncode == 0 and "chat serves chat@1 (80%), canary chat@2 (20%, judged by baton)" in started.stdout
        assert _admin(server, "GET", "/deployments/chat")["canary"]["analysis"]["steps"] == [50, 75]
        assert "(20%, auto)" in baton("deployments", *remote).stdout
        assert "20% of requests, judged by baton" in baton("status", *remote).stdout
        assert _admin(server, "GET", "/deployments/chat")["canary"]["analysis"]["promote_after_s"] == 600
        stepped = baton("canary", "chat", "--weight", "60", "--reason", "looks fine", *remote)  # between the analysis' steps
        assert stepped.returncode == 0 and "step chat chat@1 -> chat@2 (canary 20% -> 60%)" in stepped.stdout, stepped.stdout
        assert "chat serves chat@1 (40%), canary chat@2 (60%, judged by baton)" in stepped.stdout
        assert [e["reason"] for e in Registry(home).history("chat") if e["action"] == "step"][-1:] == ["looks fine"]
        assert _admin(server, "POST", "/deployments/chat/canary/step", expect=400, weight=100)["error"]["param"] == "weight"
        assert baton("canary", "chat", "abort", *remote).returncode == 0
        assert _admin(server, "POST", "/deployments/chat/canary/step", expect=409, weight=50)["error"]["message"] == "Deployment chat has no canary."
        assert baton("canary", "chat", "--mirror", "30", *remote).returncode == 2  # a mirror starts a canary: it needs --to
        mirrored = baton("canary", "chat", "--to", "chat@2", "--mirror", "30", *remote)  # no --weight: 0, copies only
        assert mirrored.returncode == 0 and "chat serves chat@1 (100%), canary chat@2 (0%, 30% mirrored)" in mirrored.stdout, mirrored.stdout
        assert "(0%, 30% mirrored)" in baton("deployments", *remote).stdout
        assert "0% of requests, 30% mirrored" in baton("status", *remote).stdout
        assert baton("canary", "chat", "abort", *remote).returncode == 0
        deployed = baton("deploy", "other", "--model", "chat@2", *remote)
        assert deployed.returncode == 0 and "other serves chat@2" in deployed.stdout
        again = baton("deploy", "other", "--model", "chat@2", *remote)
        assert again.returncode == 1 and "exists" in again.stderr


def test_cli_swap_on_a_terminal_counts_the_running_phases_seconds(home):
    """A cold start takes a minute on a GPU: on a terminal the running phase shows its
    seconds as they pass, then its finished line takes its place."""
    import pty

    third = Registry(home).resolve("chat@3").path.name
    with _server(home, FakeEngineFactory({third: FakeBehaviour(start_seconds=1.5)})) as server:
        reader, writer = pty.openpty()
        command = [sys.executable, "-m", "server.cli.main", "swap", "chat", "--to", "chat@3", "--strategy", "blue-green", "--server", server.url]
        with subprocess.Popen(command, stdout=writer, stderr=writer) as process:
            os.close(writer)
            output = b""
            while chunk := _read_pty(reader):
                output += chunk
            assert process.wait(timeout=60) == 0
        os.close(reader)
    text = output.decode()
    assert re.search(r"\r\x1b\[K  load +1\.\d s \.\.\.", text), text  # still loading, a second in
    assert re.search(r"\r\x1b\[K  load +1\.\d{3} s\r\n", text) and "succeeded: chat serves chat@3" in text, text


def _read_pty(reader: int) -> bytes:
    try:
        return os.read(reader, 4096)
    except OSError:  # the child closed its end
        return b""


def test_removing_a_deployment_lets_its_streams_finish_then_stops_its_engines_for_good(home):
    factory = FakeEngineFactory(default=FakeBehaviour(token_seconds=0.02))
    with _server(home, factory) as server:
        _admin(server, "POST", "/deployments", expect=201, name="other", model="chat@2")
        _admin(server, "POST", "/deployments", expect=201, name="relying", model="chat@1", on_demand=True, health={"fallbacks": ["other"]})
        assert _admin(server, "DELETE", "/deployments/other", expect=409)["error"]["code"] == "deployment_in_use"
        _admin(server, "DELETE", "/deployments/relying")
        _admin(server, "POST", "/deployments/other/canary", to="chat@3", weight=50)
        engines = factory.built[1:]  # other's active and canary
        streamed = {}

        def stream():
            chunks = server.client().chat.completions.create(model="other", messages=HI, max_tokens=40, stream=True)
            streamed["finish_reasons"] = [c.choices[0].finish_reason for c in chunks if c.choices]

        client = threading.Thread(target=stream)
        client.start()
        while _admin(server, "GET", "/deployments/other")["in_flight"] == 0:
            time.sleep(0.01)
        record = _admin(server, "DELETE", "/deployments/other?reason=retired")
        client.join(timeout=30)
        assert (record["status"], record["from_version"], record["to_version"]) == ("succeeded", "chat@2", None)
        assert [p["name"] for p in record["phases"]] == ["unroute", "drain", "drain", "stop"]
        assert streamed["finish_reasons"][-1] == "length"  # drained: the stream ran to its end
        assert len(engines) == 2 and not any(engine.health().is_ready for engine in engines)
        with pytest.raises(openai.NotFoundError):
            server.client().chat.completions.create(model="other", messages=HI)
        assert _admin(server, "GET", "/deployments/other", expect=404)["error"]["code"] == "deployment_not_found"
        assert _admin(server, "DELETE", "/deployments/other", expect=404)["error"]["code"] == "deployment_not_found"
        assert _admin(server, "DELETE", "/deployments/chat?wait=false")["action"] == "remove"  # answered at once; polled below
        while _admin(server, "GET", "/deployments") != []:
            time.sleep(0.01)
    assert "other" not in Registry(home).saved_deployments()
    assert any(e["action"] == "remove" and e["reason"] == "retired" and e["version"] == 2 for e in Registry(home).history("chat"))


def test_a_swap_that_waited_for_a_removal_loads_nothing(home):
    from server.deployments.manager import DeploymentManager

    async def race() -> list:
        factory = FakeEngineFactory()
        manager = DeploymentManager(Settings(home=home, models=[], restore_state=False), Registry(home), factory)
        await manager.deploy("gone", "chat@1", Change("tester"))
        outcomes = await asyncio.gather(
            manager.remove("gone", Change("tester")), manager.swap("gone", "chat@2", "blue-green", Change("tester")), return_exceptions=True
        )
        return [*outcomes, len(factory.built)]

    removed, swap_error, num_engines = asyncio.run(race())
    assert removed.status == "succeeded" and num_engines == 1  # the swap's engine was never built
    assert isinstance(swap_error, ModelNotFoundError) and "was removed" in swap_error.message


def test_a_deployed_version_cannot_be_deleted_unless_forced(home):
    with _server(home, FakeEngineFactory()) as server:
        refused = httpx.delete(f"{server.url}/admin/models/chat@1")
        assert refused.status_code == 409 and "deployment chat (active)" in refused.json()["error"]["message"]


def test_a_version_force_deleted_on_standby_still_comes_back_by_rollback(tmp_path, tiny_model_path, demo_model_path):
    home = tmp_path / "home"
    registry = Registry(home)
    for folder in (tiny_model_path, build_tiny_model(tmp_path / "v2", demo_model_path, seed=1)):
        registry.import_folder(folder, "chat", {"kind": "local"}, TRANSFORMERS, Change("tester"))
    with _server(home) as server:
        before = _ask(server.client())
        _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="blue-green")
        refused = httpx.delete(f"{server.url}/admin/models/chat@1")
        assert refused.status_code == 409 and "deployment chat (standby)" in refused.json()["error"]["message"]
        assert httpx.delete(f"{server.url}/admin/models/chat@1", params={"force": "true"}).status_code == 200
        record = _admin(server, "POST", "/deployments/chat/rollback")
        assert (record["to_version"], record["strategy"]) == ("chat@1", "standby")
        assert _ask(server.client()) == before  # the same weights, though their files are gone
        gone = httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@9"})
        assert gone.status_code == 404  # a version neither stored nor on standby


def test_auto_picks_replace_when_it_cannot_reload_and_both_do_not_fit(home):
    one_version = _estimate(home)
    with _server(home, FakeEngineFactory(), memory_budget_bytes=int(one_version * 1.5)) as server:
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@3", strategy="auto")
        assert record["strategy"] == "replace"
        assert record["strategy_reason"].startswith("no reload (tensor model.layers.2.")
        assert "memory budget has" in record["strategy_reason"]
        assert _admin(server, "GET", "/deployments/chat")["standby"] is None  # no room to keep it


def test_a_dry_run_says_what_a_swap_would_do_and_does_nothing(home):
    """Real engines, CLI and API: the plan is the swap's own (refusals included), and nothing
    loads, flips or lands in the history."""
    one_version = _estimate(home)
    num_events = len(Registry(home).history("chat"))
    with _server(home, memory_budget_bytes=int(one_version * 1.5)) as server:
        cli = subprocess.run([sys.executable, "-m", "server.cli.main", "swap", "chat", "--to", "chat@2", "--dry-run", "--server", server.url], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.startswith("dry run: swap chat chat@1 -> chat@2 would be reload (same layout") and "new requests wait" in cli.stdout
        plan = _admin(server, "POST", "/deployments/chat/swap", to="chat@3", dry_run=True)
        third = _estimate(home, "chat@3")
        assert (plan["strategy"], plan["requests_wait"], plan["needed_bytes"], plan["to_version"]) == ("replace", True, third, "chat@3")
        assert plan["reload_blocker"].startswith("tensor model.layers.2.")
        refused = _admin(server, "POST", "/deployments/chat/swap", expect=409, to="chat@3", strategy="blue-green", dry_run=True)["error"]
        assert refused["code"] == "strategy_not_applicable"
        assert _admin(server, "POST", "/deployments/chat/swap", expect=404, to="chat@9", dry_run=True)["error"]["code"] == "version_not_found"
        status = _admin(server, "GET", "/status")["deployments"][0]
        assert (status["version"], status["standby"], status["is_swapping"]) == ("chat@1", None, False)
        assert _admin(server, "POST", "/deployments/chat/rollback", expect=409, dry_run=True)["error"]["message"].endswith("no previous version to roll back to.")
    assert len(Registry(home).history("chat")) == num_events
    with _server(home) as server:
        _admin(server, "POST", "/deployments/chat/swap", to="chat@2")
        back = subprocess.run([sys.executable, "-m", "server.cli.main", "rollback", "chat", "--dry-run", "--server", server.url], capture_output=True, text=True, timeout=120)
        assert back.returncode == 0 and back.stdout.startswith("dry run: swap chat chat@2 -> chat@1 would be reload"), back.stdout + back.stderr
        assert _admin(server, "GET", "/deployments/chat")["version"] == "chat@2"


def test_explicit_blue_green_that_cannot_fit_is_refused_before_anything_loads(home):
    one_version = _estimate(home)
    num_events = len(Registry(home).history("chat"))
    with _server(home, FakeEngineFactory(), memory_budget_bytes=int(one_version * 1.5)) as server:
        refused = _admin(server, "POST", "/deployments/chat/swap", expect=409, to="chat@3", strategy="blue-green")["error"]
        assert refused["code"] == "strategy_not_applicable"
        third = _estimate(home, "chat@3")
        assert f"needs {third} bytes" in refused["message"]
        canary = _admin(server, "POST", "/deployments/chat/canary", expect=409, to="chat@3", weight=10)["error"]  # the same room
        assert canary["code"] == "insufficient_memory" and f"needs {third} bytes" in canary["message"]
        assert _admin(server, "GET", "/deployments/chat")["version"] == "chat@1"
    assert len(Registry(home).history("chat")) == num_events  # refused, not a failed swap


def test_standby_on_an_engine_that_sleeps_frees_its_memory_and_wakes_to_swap_back(home):
    one_version = _estimate(home)
    with _server(home, FakeEngineFactory(default=FakeBehaviour(sleeps=True))) as server:
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="blue-green")
        assert record["phases"][-1]["detail"].startswith("asleep on standby")
        status = _admin(server, "GET", "/status")
        assert status["deployments"][0]["standby"]["state"] == "asleep"
        assert status["memory_in_use_bytes"] == one_version  # the sleeping one holds no device memory
        back = _admin(server, "POST", "/deployments/chat/swap", to="chat@1", strategy="auto")
        assert (back["strategy"], [p["name"] for p in back["phases"]]) == ("standby", ["wake", "flip", "drain", "park"])
        assert _ask(server.client())[0] == "chat@1"  # an engine still asleep would have refused it
        assert _admin(server, "GET", "/deployments/chat")["standby"]["state"] == "asleep"


def test_standby_swaps_in_turn_when_both_awake_do_not_fit(home):
    """vLLM on one GPU: each engine reserves most of the device, so the active version drains
    and falls asleep before the standby wakes; requests wait meanwhile, and none fails."""
    one_version = _estimate(home)
    factory = FakeEngineFactory(default=FakeBehaviour(sleeps=True, token_seconds=0.01))
    with _server(home, factory, memory_budget_bytes=int(one_version * 1.5)) as server:
        replaced = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="replace")
        assert replaced["phases"][1]["detail"].startswith("asleep on standby")  # replace sleeps the old one
        results, errors, stop = [], [], threading.Event()

        def keep_asking():
            own = server.client()
            while not stop.is_set():
                try:
                    results.append(_ask(own)[0])
                except Exception as error:  # any failure at all is what this test looks for
                    errors.append(error)

        clients = [threading.Thread(target=keep_asking) for _ in range(4)]
        for thread in clients:
            thread.start()
        records = [_admin(server, "POST", "/deployments/chat/swap", to=f"chat@{1 + i % 2}", strategy="auto") for i in range(4)]
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
        assert _admin(server, "GET", "/status")["memory_in_use_bytes"] == one_version
    assert errors == []
    assert {"chat@1", "chat@2"} <= set(results)
    for record in records:
        assert record["strategy"] == "standby" and record["status"] == "succeeded"
        assert [p["name"] for p in record["phases"]] == ["drain", "park", "wake", "flip"]


def test_a_standby_that_cannot_wake_leaves_the_old_version_serving(home):
    one_version = _estimate(home)
    first = Registry(home).resolve("chat@1").path.name
    factory = FakeEngineFactory({first: FakeBehaviour(sleeps=True, fails_to_wake=True)}, default=FakeBehaviour(sleeps=True))
    with _server(home, factory, memory_budget_bytes=int(one_version * 1.5)) as server:
        replaced = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="replace")
        assert replaced["phases"][1]["detail"].startswith("asleep on standby")  # replace sleeps the old one
        failure = _admin(server, "POST", "/deployments/chat/swap", expect=500, to="chat@1", strategy="auto")["error"]
        assert failure["code"] == "swap_failed" and "chat@2 keeps serving" in failure["message"]
        assert _ask(server.client())[0] == "chat@2"
        assert _admin(server, "GET", "/deployments/chat")["standby"] is None


def _deploy_on_demand(server, name: str, ref: str, idle_ttl_s: float = 300.0) -> dict:
    return _admin(server, "POST", "/deployments", expect=201, name=name, model=ref, on_demand=True, idle_ttl_s=idle_ttl_s)


def _ask_model(server, model: str, max_tokens: int = 2) -> str:
    raw = server.client().chat.completions.with_raw_response.create(model=model, messages=HI, max_tokens=max_tokens)
    return raw.headers["x-baton-version"]


def test_an_operator_unloads_an_on_demand_deployment_its_streams_finish_and_the_next_request_loads_it(home):
    factory = FakeEngineFactory(default=FakeBehaviour(token_seconds=0.02))
    loads_of = lambda name: len([e for e in Registry(home).history("chat") if e["action"] == "load" and e["details"]["deployment"] == name])  # noqa: E731
    loads_before = loads_of("lazy")  # the module's home: other tests loaded before
    with _server(home, factory) as server:
        _deploy_on_demand(server, "lazy", "chat@2")
        assert _ask_model(server, "lazy") == "chat@2"  # loaded
        streamed = {}

        def stream():
            chunks = server.client().chat.completions.create(model="lazy", messages=HI, max_tokens=40, stream=True)
            streamed["finish_reasons"] = [c.choices[0].finish_reason for c in chunks if c.choices]

        def streaming() -> threading.Thread:
            client = threading.Thread(target=stream)
            client.start()
            while _admin(server, "GET", "/deployments/lazy")["in_flight"] == 0:
                time.sleep(0.01)
            return client

        client = streaming()
        record = _admin(server, "POST", "/deployments/lazy/unload", reason="free the GPU")
        client.join(timeout=30)
        assert (record["status"], record["action"], record["from_version"]) == ("succeeded", "unload", "chat@2")
        assert [p["name"] for p in record["phases"]] == ["unroute", "drain", "stop"]
        assert streamed["finish_reasons"][-1] == "length"  # drained: the stream ran to its end
        assert _admin(server, "GET", "/deployments/lazy")["state"] == "unloaded" and not factory.built[-1].health().is_ready
        assert _admin(server, "POST", "/deployments/lazy/unload", expect=409)["error"]["code"] == "not_loaded"
        assert _ask_model(server, "lazy") == "chat@2"  # loaded again

        client = streaming()
        assert _admin(server, "POST", "/deployments/lazy/unload", wait=False)["status"] == "running"  # draining the stream
        assert _ask_model(server, "lazy") == "chat@2"  # arrived mid-unload: waits for the load it starts
        client.join(timeout=30)
        assert loads_of("lazy") - loads_before == 3
        assert _admin(server, "POST", "/deployments/chat/unload", expect=409)["error"]["code"] == "not_on_demand"
        cli = subprocess.run([sys.executable, "-m", "server.cli.main", "unload", "lazy", "--server", server.url], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and "unloaded: lazy loads chat@2 again on its next request" in cli.stdout, cli.stdout + cli.stderr
        assert _admin(server, "POST", "/deployments/nope/unload", expect=404)["error"]["code"] == "deployment_not_found"


def test_a_request_during_an_idle_unload_loads_only_once_the_old_engine_has_stopped(home):
    """One engine's memory at a time: on a GPU a load beside an engine still exiting finds
    its memory taken (vLLM then refuses to start), so the request waits for the unload."""
    factory = FakeEngineFactory(default=FakeBehaviour(stop_seconds=1.0))
    with _server(home, factory, idle_check_s=0.1) as server:
        _deploy_on_demand(server, "lazy", "chat@2", idle_ttl_s=0.3)
        assert _ask_model(server, "lazy") == "chat@2"
        old = factory.built[-1]
        while old.stop_began_at is None:  # idle past its TTL: unloading
            time.sleep(0.01)
        assert _ask_model(server, "lazy") == "chat@2"
        new = factory.built[-1]
        assert new is not old and new.start_began_at >= old.stopped_at, (new.start_began_at, old.stopped_at)


def test_on_demand_loads_on_first_request_and_unloads_when_idle(home):
    factory = FakeEngineFactory({Registry(home).resolve("chat@2").path.name: FakeBehaviour(start_seconds=0.5)})
    num_loads = lambda: len([e for e in Registry(home).history("chat") if e["action"] == "load"])  # noqa: E731
    before = num_loads()  # the module's home: other tests loaded before
    with _server(home, factory, idle_check_s=0.1) as server:
        assert _deploy_on_demand(server, "lazy", "chat@2", idle_ttl_s=0.5)["state"] == "unloaded"
        waiting = [threading.Thread(target=lambda: _ask_model(server, "lazy")) for _ in range(3)]
        for thread in waiting:
            thread.start()
        for thread in waiting:
            thread.join(timeout=30)
        assert _admin(server, "GET", "/deployments/lazy")["state"] == "ready"
        assert num_loads() - before == 1  # three requests, one load
        deadline = time.monotonic() + 10
        while _admin(server, "GET", "/deployments/lazy")["state"] != "unloaded":
            assert time.monotonic() < deadline, "the idle deployment was not unloaded"
            time.sleep(0.1)
        assert _ask_model(server, "lazy") == "chat@2"  # loads again


def test_an_on_demand_load_that_fails_says_so_and_the_next_request_tries_again(home):
    factory = FakeEngineFactory({Registry(home).resolve("chat@2").path.name: FakeBehaviour(fails_to_start=True)})
    with _server(home, factory) as server:
        _deploy_on_demand(server, "lazy", "chat@2")
        for attempt in (1, 2):
            response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "lazy", "messages": HI, "max_tokens": 2}, timeout=30)
            error = response.json()["error"]
            assert error["code"] == "swap_failed" and "Loading chat@2 for lazy on demand failed" in error["message"], error
            assert "the next request tries again" in error["message"] and len(factory.built) == 1 + attempt


def test_swapping_an_unloaded_on_demand_deployment_retargets_its_next_load(home):
    with _server(home, FakeEngineFactory()) as server:
        _deploy_on_demand(server, "lazy", "chat@2")
        record = _admin(server, "POST", "/deployments/lazy/swap", to="chat@1")
        assert (record["status"], record["strategy"], record["from_version"]) == ("succeeded", "on-demand", "chat@2")
        assert _admin(server, "GET", "/deployments/lazy")["state"] == "unloaded"  # nothing loaded for it
        assert _ask_model(server, "lazy") == "chat@1"
        _admin(server, "POST", "/deployments/lazy/swap", expect=409, to="chat@1")


def test_rolling_back_an_unloaded_on_demand_deployment_retargets_its_next_load(home):
    with _server(home, FakeEngineFactory(), idle_check_s=0.1) as server:
        _deploy_on_demand(server, "lazy", "chat@2", idle_ttl_s=0.3)
        assert _ask_model(server, "lazy") == "chat@2"
        _admin(server, "POST", "/deployments/lazy/swap", to="chat@1")  # loaded: a real swap
        assert _admin(server, "GET", "/deployments/lazy")["on_demand"]["version"] == "chat@1"
        _wait_for(lambda: _admin(server, "GET", "/deployments/lazy")["state"] == "unloaded")
        record = _admin(server, "POST", "/deployments/lazy/rollback")
        assert (record["status"], record["strategy"], record["to_version"]) == ("succeeded", "on-demand", "chat@2")
        assert _admin(server, "GET", "/deployments/lazy")["previous_version"] == "chat@1"
        assert _ask_model(server, "lazy") == "chat@2"


def test_a_request_naming_a_version_is_served_by_that_version(home):
    Registry(home).set_alias("chat", "2", "beta", Change("tester"))
    with _server(home, FakeEngineFactory()) as server:
        _admin(server, "POST", "/deployments/chat/canary", to="chat@2", weight=1)
        client = server.client()
        for model in ("chat@2", "chat@beta", "chat@1"):
            raw = client.chat.completions.with_raw_response.create(model=model, messages=HI, max_tokens=2)
            served = "chat@1" if model == "chat@1" else "chat@2"
            assert (raw.headers["x-baton-version"], raw.headers["x-baton-deployment"], raw.parse().model) == (served, "chat", served)
        beta = client.models.retrieve("chat@beta").model_dump()
        assert (beta["id"], beta["root"], beta["max_model_len"]) == ("chat@beta", "chat@2", 4096)  # the canary's engine
        assert client.models.retrieve("chat").model_dump()["root"] == "chat@1"
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model="chat@3", messages=HI, max_tokens=2)
        assert "not served now" in str(refused.value) and "chat@1, chat@2" in str(refused.value)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="chat@nosuch", messages=HI, max_tokens=2)
        _admin(server, "POST", "/deployments/chat/canary/abort")
        with pytest.raises(openai.NotFoundError, match="not served now"):
            client.chat.completions.create(model="chat@2", messages=HI, max_tokens=2)


def test_a_request_naming_the_version_an_unloaded_on_demand_deployment_serves_loads_it(home):
    with _server(home, FakeEngineFactory()) as server:
        _deploy_on_demand(server, "lazy", "chat@2")
        unloaded = server.client().models.retrieve("lazy").model_dump()
        assert (unloaded["root"], unloaded["max_model_len"]) == ("chat@2", None)  # what it loads next; no context until it does
        assert _ask_model(server, "chat@2") == "chat@2"
        assert _admin(server, "GET", "/deployments/lazy")["state"] == "ready"


def test_on_demand_evicts_the_least_recently_used_idle_deployment(home):
    one_version = _estimate(home)
    with _server(home, FakeEngineFactory(), memory_budget_bytes=int(one_version * 2.5)) as server:
        _deploy_on_demand(server, "first", "chat@1")
        _deploy_on_demand(server, "second", "chat@2")
        assert _ask_model(server, "first") == "chat@1"  # chat + first fit
        assert _ask_model(server, "second") == "chat@2"  # evicts first, idle
        assert _admin(server, "GET", "/deployments/first")["state"] == "unloaded"
        assert _admin(server, "GET", "/deployments/chat")["state"] == "ready"  # always-on: never evicted
        assert any(e["action"] == "unload" and "least recently used" in e["reason"] for e in Registry(home).history("chat"))


def test_on_demand_never_evicts_a_deployment_with_requests_in_flight(home):
    slow = FakeEngineFactory({Registry(home).resolve("chat@1").path.name: FakeBehaviour(token_seconds=0.05)})
    one_version = _estimate(home)
    with _server(home, slow, memory_budget_bytes=int(one_version * 2.5)) as server:
        _deploy_on_demand(server, "busy", "chat@1")
        _deploy_on_demand(server, "other", "chat@2")
        body = {"model": "busy", "messages": HI, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()  # kept open: closing it would disconnect the client
            next(lines)  # busy is loaded and streaming
            refused = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "other", "messages": HI, "max_tokens": 1}, timeout=30)
            assert refused.status_code == 503 and "busy or always-on" in refused.json()["error"]["message"]
            assert "data: [DONE]" in list(lines)  # the busy stream finished whole
        assert _admin(server, "GET", "/deployments/busy")["state"] == "ready"


def test_admin_status_names_the_engine_of_each_deployment(home):
    with _server(home) as server:
        status = _admin(server, "GET", "/status")
        assert [(d["name"], d["active"]["engine"]) for d in status["deployments"]] == [("chat", "transformers")]


def test_smoke_prompts_are_set_per_deployment(home):
    with _server(home, FakeEngineFactory()) as server:
        _admin(server, "POST", "/deployments", expect=201, name="checked", model="chat@1", smoke_prompts=["one two", "three"])
        record = _admin(server, "POST", "/deployments/checked/swap", to="chat@2")
        assert [p["detail"] for p in record["phases"] if p["name"] == "verify"] == ["2 smoke prompt(s) answered"]
        default = _admin(server, "POST", "/deployments/chat/swap", to="chat@2")
        assert [p["detail"] for p in default["phases"] if p["name"] == "verify"] == ["1 smoke prompt(s) answered"]
        bad = _admin(server, "POST", "/deployments", expect=400, name="bad", model="chat@1", smoke_prompts=[])
        assert bad["error"]["param"] == "smoke_prompts"


def test_reload_swaps_weights_inside_the_running_engine_and_back(home):
    one_version = _estimate(home)
    with _server(home) as server:
        client = server.client()
        first = _ask(client)
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="reload")
        assert (record["strategy"], [p["name"] for p in record["phases"]]) == ("reload", ["prefetch", "drain", "reload", "verify", "flip"])
        second = _ask(client)
        assert second[0] == "chat@2" and second[1] != first[1]
        status = _admin(server, "GET", "/status")
        assert status["memory_in_use_bytes"] == one_version and status["deployments"][0]["standby"] is None  # one engine throughout
        back = _admin(server, "POST", "/deployments/chat/rollback")
        assert (back["strategy"], back["strategy_reason"]) == ("reload", "same layout: weights swap inside the running engine")
        assert _ask(client) == first  # byte-identical after swapping back


def test_reload_to_another_layout_is_refused_and_auto_says_why_it_loads_beside(home):
    with _server(home, FakeEngineFactory()) as server:
        refused = _admin(server, "POST", "/deployments/chat/swap", expect=409, to="chat@3", strategy="reload")["error"]
        assert refused["code"] == "strategy_not_applicable"
        assert "tensor model.layers.2.input_layernorm.weight: absent -> F32[64]" in refused["message"]
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@3")
        assert record["strategy"] == "blue-green" and record["strategy_reason"].endswith("both fit the memory budget")


def test_a_reload_that_fails_half_way_puts_the_old_weights_back(home):
    first = Registry(home).resolve("chat@1").path.name
    with _server(home, FakeEngineFactory({first: FakeBehaviour(fails_to_reload=True)})) as server:
        failure = _admin(server, "POST", "/deployments/chat/swap", expect=500, to="chat@2", strategy="reload")["error"]
        assert failure["code"] == "swap_failed" and "chat@1 keeps serving" in failure["message"]
        assert _ask(server.client(), max_tokens=2) == ("chat@1", f"{_label(home, 'chat@1')} " * 2)  # not a mix
        assert _admin(server, "GET", "/deployments/chat")["active"]["state"] == "ready"


def test_replace_puts_the_old_version_to_sleep_and_a_failed_load_wakes_it(home):
    third = Registry(home).resolve("chat@3").path.name
    factory = FakeEngineFactory({third: FakeBehaviour(sleeps=True, fails_to_start=True)}, default=FakeBehaviour(sleeps=True))
    with _server(home, factory) as server:
        failure = _admin(server, "POST", "/deployments/chat/swap", expect=500, to="chat@3", strategy="replace")["error"]
        assert "chat@1 keeps serving" in failure["message"]
        assert _ask(server.client(), max_tokens=1)[0] == "chat@1"  # awake again: a sleeping engine refuses
        replaced = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="replace")
        assert [p["name"] for p in replaced["phases"]] == ["drain", "unload", "load", "verify", "flip"]
        assert _admin(server, "GET", "/deployments/chat")["standby"]["state"] == "asleep"
        assert _admin(server, "POST", "/deployments/chat/rollback")["strategy"] == "standby"
        assert _ask(server.client(), max_tokens=1)[0] == "chat@1"


def test_serving_a_registry_version_applies_its_engine_options_as_a_swap_would(tmp_path, tiny_model_path):
    registry = Registry(tmp_path)
    options = ImportOptions(engine_options={"engine": "transformers", "max_batch_size": 3})
    version, _ = registry.import_folder(tiny_model_path, "chat", {"kind": "local"}, options, Change("tester"))
    spec = ModelSpec(name="chat", path=version.path, version=version.ref)  # as `baton serve --model chat@1` builds it
    with ServerThread(Settings(home=tmp_path, models=[spec])) as server:
        health = httpx.get(f"{server.url}/health").json()["models"]["chat"]
        assert (health["engine"], health["details"]["max_batch_size"]) == ("transformers", 3)


def test_a_version_that_would_overflow_the_host_budget_for_sleepers_is_stopped_not_slept(home):
    one_version = Registry(home).resolve("chat@1").manifest.total_bytes
    factory = FakeEngineFactory(default=FakeBehaviour(sleeps=True))
    with _server(home, factory, standby_host_budget_bytes=one_version - 1) as server:
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="replace")
        assert record["phases"][1]["detail"] == "stopped; memory freed"
        assert _admin(server, "GET", "/deployments/chat")["standby"] is None


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_engine_that_dies_mid_stream_ends_its_stream_and_the_version_starts_again(home):
    factory = FakeEngineFactory(default=FakeBehaviour(token_seconds=0.05))
    with _server(home, factory, idle_check_s=0.1) as server:
        body = {"model": "chat", "messages": HI, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = filter(None, response.iter_lines())
            next(lines)
            factory.built[0].die()
            events = [line for line in lines]
        assert sse_errors(events[-1:])  # a clean error event, within the stream, not a hang
        _wait_for(lambda: len(factory.built) == 2 and _admin(server, "GET", "/deployments/chat")["state"] == "ready")
        assert _ask(server.client(), max_tokens=2) == ("chat@1", f"{_label(home, 'chat@1')} " * 2)
    recovered = [e for e in Registry(home).history("chat") if e["action"] == "recover"]
    assert recovered and recovered[-1]["details"]["status"] == "succeeded"


def test_a_dead_engine_is_replaced_by_the_standby_when_there_is_one(home):
    factory = FakeEngineFactory()
    with _server(home, factory, idle_check_s=0.1) as server:
        _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="blue-green")  # chat@1 on standby
        factory.built[1].die()
        _wait_for(lambda: _admin(server, "GET", "/deployments/chat")["version"] == "chat@1")
        assert _ask(server.client(), max_tokens=1)[0] == "chat@1" and len(factory.built) == 2  # nothing loaded


def test_a_canary_whose_engine_dies_is_dropped_and_the_active_version_serves_everything(home):
    factory = FakeEngineFactory()
    with _server(home, factory, idle_check_s=0.1) as server:
        _admin(server, "POST", "/deployments/chat/canary", to="chat@2", weight=50)
        factory.built[1].die()
        _wait_for(lambda: _admin(server, "GET", "/deployments/chat")["canary"] is None)
        assert {_ask(server.client(), max_tokens=1)[0] for _ in range(10)} == {"chat@1"}
        assert not factory.built[1].health().is_ready and len(factory.built) == 2  # stopped, nothing new loaded
    aborts = [e for e in Registry(home).history("chat") if e["action"] == "abort"]
    assert aborts[-1]["actor"] == "baton" and aborts[-1]["reason"] == "the canary's engine died"


def test_a_standby_whose_engine_dies_is_stopped_and_a_rollback_goes_another_way(home):
    factory = FakeEngineFactory()
    with _server(home, factory, idle_check_s=0.1) as server:
        _admin(server, "POST", "/deployments/chat/swap", to="chat@2", strategy="blue-green")  # chat@1 on standby
        factory.built[0].die()
        _wait_for(lambda: _admin(server, "GET", "/deployments/chat")["standby"] is None)
        back = _admin(server, "POST", "/deployments/chat/rollback")
        assert (back["strategy"], back["status"]) == ("reload", "succeeded")  # same layout: into the running engine
        assert _ask(server.client(), max_tokens=1)[0] == "chat@1"


class _WorkerKilled(BaseException):
    """What kills a thread outright (as an interpreter fault would), unlike an Exception."""


def test_a_transformers_engine_whose_worker_dies_ends_its_stream_and_is_restarted(home):
    from server.engines.factory import build_engine

    built = []

    def recording_factory(path, options):
        built.append(build_engine(path, options))
        return built[-1]

    def die():
        raise _WorkerKilled()

    with _server(home, recording_factory, idle_check_s=0.1) as server:
        body = {"model": "chat", "messages": HI, "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = filter(None, response.iter_lines())
            next(lines)
            built[0]._batch.step = die
            events = list(lines)
        assert sse_errors(events[-1:])  # within the stream, not a hang
        _wait_for(lambda: len(built) == 2 and _admin(server, "GET", "/deployments/chat")["state"] == "ready", seconds=60)
        assert _ask(server.client(), max_tokens=2)[0] == "chat@1"


def test_a_version_that_cannot_restart_leaves_the_deployment_down_until_a_swap(home, monkeypatch):
    from server.deployments import engine_watch

    monkeypatch.setattr(engine_watch, "MAX_RESTARTS", 2)
    first = Registry(home).resolve("chat@1").path.name
    factory = FakeEngineFactory()
    with _server(home, factory, idle_check_s=0.1) as server:
        factory.behaviours[first] = FakeBehaviour(fails_to_start=True)  # from now on chat@1 cannot start
        factory.built[0].die()
        _wait_for(lambda: any(r["action"] == "recover" and r["status"] == "failed" for r in _history_records(home)))
        down = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": HI, "max_tokens": 1})
        assert down.status_code == 503 and "failed to start 2 times" in down.json()["error"]["message"]
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2")
        assert (record["status"], record["strategy"]) == ("succeeded", "load")
        assert _ask(server.client(), max_tokens=1)[0] == "chat@2"


def _history_records(home: Path) -> list[dict]:
    return [e["details"] for e in Registry(home).history("chat") if "status" in e.get("details", {})]


def test_new_engine_options_restart_the_version_it_serves_through_a_swap(home):
    """The admin API and the CLI: a swap to the version a deployment serves, with new engine
    options, starts an engine with them beside the old (never a reload: that keeps the
    engine); the same options again are a 409."""
    import subprocess
    import sys

    with _server(home) as server:
        client = server.client()
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@1", engine_options={"engine": "transformers", "max_batch_size": 3})
        assert (record["status"], record["strategy"]) == ("succeeded", "blue-green"), record
        health = httpx.get(f"{server.url}/health").json()["models"]["chat"]
        assert health["details"]["max_batch_size"] == 3 and _ask(client)[0] == "chat@1"
        again = _admin(server, "POST", "/deployments/chat/swap", expect=409, to="chat@1", engine_options={"engine": "transformers", "max_batch_size": 3})
        assert "already serves chat@1" in again["error"]["message"]
        bad = _admin(server, "POST", "/deployments/chat/swap", expect=400, to="chat@1", engine_options={"max_batch_size": "lots"})
        assert bad["error"]["param"] == "engine_options"
        cli = [sys.executable, "-m", "server.cli.main", "swap", "chat", "--to", "chat@1", "--engine-option", "engine=transformers", "--engine-option", "max_batch_size=5", "--server", server.url]
        swapped = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert swapped.returncode == 0 and "succeeded: chat serves chat@1" in swapped.stdout, swapped.stdout + swapped.stderr
        assert httpx.get(f"{server.url}/health").json()["models"]["chat"]["details"]["max_batch_size"] == 5


def test_a_new_tool_parser_applies_in_place_without_starting_an_engine(home):
    """Only how output is read changes: the running engine takes the option at once (no
    engine starts, nothing is held)."""
    with _server(home) as server:
        started = _engine_starts(server)
        assert started >= 1  # the engine serving chat@1
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@1", engine_options={"tool_parser": "mistral"})
        assert (record["status"], record["strategy"]) == ("succeeded", "in-place"), record
        assert [phase["name"] for phase in record["phases"]] == ["retarget"] and _engine_starts(server) == started
        assert _admin(server, "GET", "/deployments/chat")["active"]["options"]["tool_parser"] == "mistral"
        assert _ask(server.client())[0] == "chat@1"
        again = _admin(server, "POST", "/deployments/chat/swap", expect=409, to="chat@1", engine_options={"tool_parser": "mistral"})
        assert "already serves chat@1" in again["error"]["message"]


def _engine_starts(server) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("baton_engine_starts_total{") and 'outcome="started"' in line)


def test_a_server_without_standby_starts_engines_without_sleep_mode(home):
    """Nothing is parked, so vLLM keeps its own allocator; a version's own choice still wins."""
    with _server(home, FakeEngineFactory(), keep_standby=False) as server:
        assert _admin(server, "GET", "/deployments/chat")["active"]["options"]["sleep_mode"] is False
        record = _admin(server, "POST", "/deployments/chat/swap", to="chat@2", engine_options={"engine": "transformers", "sleep_mode": True})
        assert record["status"] == "succeeded"
        assert _admin(server, "GET", "/deployments/chat")["active"]["options"]["sleep_mode"] is True
    with _server(home, FakeEngineFactory()) as server:
        assert "sleep_mode" not in _admin(server, "GET", "/deployments/chat")["active"]["options"]  # vLLM's option default: on
