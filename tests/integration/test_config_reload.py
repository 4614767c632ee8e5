"""The config file through a real `baton serve --config` process: it serves what the file
names; a changed file converges through a swap (SIGHUP, or `baton reload`) with no failed
request under streaming load; a bad file changes nothing; `baton plan` and /admin/status
report the difference between the file and what runs."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from models.catalog import Change
from models.registry import ImportOptions, Registry
from tests.conftest import build_tiny_model, sse_errors
from tests.integration.test_cli import BATON, _free_port, _wait_healthy

CONFIG = """\
server:
  port: {port}
  drain_timeout_s: 30
  watch_config_s: {watch}
deployments:
  chat:
    model: {model}
    strategy: {strategy}
    engine_options: {{engine: transformers}}
"""


@pytest.fixture
def served(two_versions_home, tmp_path, request):
    """`baton serve --config` on chat@1 (the tiny model), and a way to rewrite its file."""
    home, port = two_versions_home(), _free_port()
    config = tmp_path / "baton.yaml"
    watch = getattr(request, "param", None) or "null"
    write = lambda model, strategy="auto": config.write_text(CONFIG.format(port=port, model=model, strategy=strategy, watch=watch))  # noqa: E731
    write("chat@1")
    env = {**os.environ, "BATON_HOME": str(home)}
    with _serving(config, port, env, tmp_path / "serve.log") as (url, process):
        yield url, process, config, write, env


@contextmanager
def _serving(config: Path, port: int, env: dict, log: Path):
    """`baton serve --config`, healthy; stopped with SIGTERM at the end (if it still runs)."""
    with log.open("w") as output, subprocess.Popen([*BATON, "serve", "--config", str(config)], stdout=output, stderr=subprocess.STDOUT, env=env) as process:
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, process, log)
            yield url, process
        finally:  # a failed test too: else the exit waits for the server for ever
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def _version(url: str) -> str:
    return httpx.get(f"{url}/admin/status").json()["deployments"][0]["version"]


def _baton(env: dict, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BATON, *args, "--server", url], capture_output=True, text=True, env=env, timeout=300)


def _streams_during(url: str, action) -> tuple[list[str], list[str]]:
    """Streaming clients in a loop while `action` runs: the versions that served, the errors."""
    versions, errors, stop = [], [], threading.Event()
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}

    def client():
        while not stop.is_set():
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                    lines = list(filter(None, response.iter_lines()))  # events, not the blank lines between
                    if response.status_code != 200 or sse_errors(lines) or lines[-1:] != ["data: [DONE]"]:
                        errors.append(f"{response.status_code}: ...{''.join(lines)[-400:]}")  # the end: where an error event is
                    versions.append(response.headers.get("x-baton-version"))
            except httpx.HTTPError as error:
                errors.append(repr(error))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.0)
        action()
        time.sleep(1.0)
    finally:  # an assertion in `action` fails the test, and does not leave the clients looping
        stop.set()
        for thread in clients:
            thread.join()
    return versions, errors


def _wait_for_version(url: str, version: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while _version(url) != version:
        assert time.monotonic() < deadline, f"still {_version(url)}"
        time.sleep(0.2)


def test_serves_the_file_and_a_sighup_converges_on_the_changed_file_with_no_failed_request(served):
    url, process, _, write, _ = served
    assert _version(url) == "chat@1"

    def edit_and_signal():
        write("chat@2", "reload")
        process.send_signal(signal.SIGHUP)
        _wait_for_version(url, "chat@2")

    versions, errors = _streams_during(url, edit_and_signal)
    assert errors == [] and {"chat@1", "chat@2"} <= set(versions)
    history = httpx.get(f"{url}/admin/status").json()
    assert history["drift"] == []


def test_baton_reload_and_plan_and_drift(served):
    url, _, config, write, env = served
    write("chat@2")
    planned = _baton(env, url, "plan", "--config", str(config))
    assert planned.returncode == 0 and "~ chat: swap chat@1 -> chat@2" in planned.stdout, planned.stderr
    assert httpx.get(f"{url}/admin/status").json()["drift"] == ["~ chat: swap chat@1 -> chat@2"]
    reloaded = _baton(env, url, "reload")
    assert reloaded.returncode == 0 and "chat: swap succeeded" in reloaded.stdout, reloaded.stderr
    assert _version(url) == "chat@2"
    # An admin change is allowed, shows as drift, and the next reload undoes it.
    _baton(env, url, "swap", "chat", "--to", "chat@1")
    _wait_for_version(url, "chat@1")
    assert httpx.get(f"{url}/admin/status").json()["drift"] == ["~ chat: swap chat@1 -> chat@2"]
    assert _baton(env, url, "reload").returncode == 0 and _version(url) == "chat@2"


def test_a_changed_server_setting_is_said_to_need_a_restart(served):
    """A reload converges deployments only; a server setting the file now sets otherwise is
    named by plan, reload and the log, not dropped in silence."""
    url, _, config, _, env = served
    config.write_text(config.read_text().replace("drain_timeout_s: 30", "drain_timeout_s: 7"))
    said = "! server.drain_timeout_s: 30.0 -> 7.0 (at the next start; a reload changes deployments only)"
    planned = _baton(env, url, "plan", "--config", str(config))
    assert planned.returncode == 0 and said in planned.stdout.splitlines(), planned.stdout + planned.stderr
    assert httpx.post(f"{url}/admin/reload", json={}).json()["restart_needed"] == [said]
    reloaded = _baton(env, url, "reload")
    assert reloaded.returncode == 0 and said in reloaded.stdout.splitlines()


def test_a_bad_file_changes_nothing(served):
    url, _, config, write, env = served
    config.write_text(CONFIG.format(port=0, model="chat@2", strategy="teleport", watch="null"))
    refused = httpx.post(f"{url}/admin/reload", json={})
    assert refused.status_code == 400 and ":8: deployments.chat.strategy" in refused.json()["error"]["message"]
    write("chat@9")  # no such version: refused before anything changes
    unknown = httpx.post(f"{url}/admin/reload", json={})
    assert unknown.status_code == 400 and "deployments.chat.model" in unknown.json()["error"]["message"]
    assert _version(url) == "chat@1"
    plan = _baton(env, url, "plan", "--config", str(config))
    assert plan.returncode == 1 and "deployments.chat.model" in plan.stderr


def test_plan_names_an_unknown_version_as_a_bad_request(served):
    url, *_ = served
    response = httpx.post(f"{url}/admin/plan", json={"deployments": {"chat": {"model": "chat@9"}}})
    assert response.status_code == 400 and "deployments.chat.model" in response.json()["error"]["message"]


@pytest.mark.parametrize("served", [0.2], indirect=True)
def test_a_watched_file_reloads_when_it_changes(served):
    """As a mounted ConfigMap does when it is edited: no signal, no request."""
    url, _, _, write, _ = served
    write("chat@2")
    _wait_for_version(url, "chat@2", seconds=30)
    assert httpx.get(f"{url}/admin/status").json()["drift"] == []


def test_settings_change_in_place_without_a_swap(served):
    url, _, config, _, env = served
    config.write_text(config.read_text() + "    smoke_prompts: [Bonjour]\n    health: {on_breach: rollback}\n")
    planned = _baton(env, url, "plan", "--config", str(config))
    assert "~ chat: chat@1; set smoke_prompts, health" in planned.stdout, planned.stdout + planned.stderr
    (change,) = httpx.post(f"{url}/admin/reload", json={}).json()["changes"]
    assert (change["action"], change["status"]) == ("update", "succeeded")
    assert httpx.get(f"{url}/admin/status").json()["drift"] == [] and _version(url) == "chat@1"


def test_the_admin_api_deploys_with_the_config_files_deployment_fields(served):
    url, *_ = served
    refused = httpx.post(f"{url}/admin/deployments", json={"name": "docs", "model": "chat@1", "engine_options": {"colour": 1}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "engine_options"
    body = {"name": "docs", "model": "chat@2", "on_demand": True, "engine_options": {"engine": "transformers"}, "smoke_prompts": ["Hi"]}
    assert httpx.post(f"{url}/admin/deployments", json=body).status_code == 201
    assert httpx.get(f"{url}/admin/status").json()["drift"] == []  # docs is not in the file: left as it is


def _state(url: str) -> dict:
    return httpx.get(f"{url}/admin/status").json()["deployments"][0]


def _long_answer_status(url: str) -> int:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code


def test_new_engine_options_and_on_demand_apply_live(served):
    """New engine options restart the version's engine through a swap (no failed request
    under load); on_demand switches in place, and back, loading at once."""
    url, _, config, _, _ = served
    assert _long_answer_status(url) == 200

    def narrow_the_context():
        config.write_text(config.read_text().replace("{engine: transformers}", "{engine: transformers, max_model_len: 64}"))
        (change,) = httpx.post(f"{url}/admin/reload", json={}, timeout=120).json()["changes"]
        assert (change["action"], change["status"], change["new_engine_options"]) == ("swap", "succeeded", True), change

    versions, errors = _streams_during(url, narrow_the_context)
    assert errors == [] and set(versions) == {"chat@1"}
    assert _long_answer_status(url) == 400  # the new engine's context: 64 tokens
    assert _state(url)["active"]["options"]["max_model_len"] == 64 and httpx.get(f"{url}/admin/status").json()["drift"] == []

    config.write_text(config.read_text() + "    on_demand: true\n    idle_ttl_s: 0.5\n")
    (change,) = httpx.post(f"{url}/admin/reload", json={}).json()["changes"]
    assert (change["action"], change["settings"]) == ("update", ["on_demand", "idle_ttl_s"])
    deadline = time.monotonic() + 30
    while _state(url)["state"] != "unloaded":  # idle past its TTL: unloaded
        assert time.monotonic() < deadline, _state(url)
        time.sleep(0.2)

    config.write_text(config.read_text().replace("    on_demand: true\n", ""))
    (change,) = httpx.post(f"{url}/admin/reload", json={}, timeout=120).json()["changes"]
    assert change["status"] == "succeeded" and _state(url)["state"] == "ready" and _state(url)["on_demand"] is None


# Judged on traffic enough to judge (two requests each), with margins no tiny model's noise breaches.
ROLLOUT = "    canary: {weight: 50, analysis: {promote_after_s: 8, min_requests: 2, ttft_factor: 1000, tokens_per_s_factor: 0.001, error_rate_margin: 1}}\n"


def test_a_file_with_a_canary_rollout_sends_the_new_version_out_as_a_canary_that_baton_promotes(served):
    """Progressive delivery from the file: a reload starts chat@2 as a canary beside chat@1,
    the plan says it is rolling out (not drift), and the analysis promotes it; no request fails."""
    url, _, config, write, env = served
    write("chat@2")
    config.write_text(config.read_text() + ROLLOUT)

    def reload_and_wait_for_the_promotion():
        (change,) = httpx.post(f"{url}/admin/reload", json={}, timeout=120).json()["changes"]
        assert (change["action"], change["status"], change["strategy"]) == ("canary", "succeeded", "canary 50%"), change
        assert (_version(url), _state(url)["canary"]["version"]) == ("chat@1", "chat@2")  # promoted 8 s on at the soonest
        planned = _baton(env, url, "plan", "--config", str(config))
        assert "= chat: chat@1, canary chat@2 rolling out" in planned.stdout, planned.stdout + planned.stderr
        assert httpx.get(f"{url}/admin/status").json()["drift"] == []
        _wait_for_version(url, "chat@2")

    versions, errors = _streams_during(url, reload_and_wait_for_the_promotion)
    assert errors == [] and {"chat@1", "chat@2"} <= set(versions)
    assert _state(url)["canary"] is None and httpx.get(f"{url}/admin/status").json()["drift"] == []
    promoted = [e for e in httpx.get(f"{url}/admin/models/chat/history").json() if e["action"] == "promote"]
    assert [e["actor"] for e in promoted] == ["baton"], promoted


def test_the_file_naming_an_operators_canary_promotes_it(served):
    url, _, config, write, env = served
    assert _baton(env, url, "canary", "chat", "--to", "chat@2", "--weight", "20").returncode == 0
    assert httpx.get(f"{url}/admin/status").json()["drift"] == []  # the file does not speak of canaries: left
    write("chat@2")
    assert httpx.get(f"{url}/admin/status").json()["drift"] == ["~ chat: promote canary chat@2 over chat@1"]
    (change,) = httpx.post(f"{url}/admin/reload", json={}).json()["changes"]
    assert (change["action"], change["status"]) == ("promote", "succeeded"), change
    assert _version(url) == "chat@2" and _state(url)["canary"] is None


def test_a_rollout_under_way_resumes_after_a_restart_and_an_aborted_one_stays_halted(served, tmp_path, demo_model_path):
    """A restart mid-rollout starts the version the rollout runs over, its canary back beside
    it: not the file's version at once, which would skip the analysis. An aborted canary is
    not started again, by a reload or a restart; a file naming another version rolls that one
    out, at start too."""
    url, process, config, write, env = served
    write("chat@2")
    config.write_text(config.read_text() + "    canary: {weight: 50}\n")  # no analysis: the operator promotes
    (change,) = httpx.post(f"{url}/admin/reload", json={}, timeout=120).json()["changes"]
    assert (change["action"], change["status"]) == ("canary", "succeeded"), change
    port = int(url.rsplit(":", 1)[1])

    def restart(process) -> None:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0

    restart(process)
    with _serving(config, port, env, tmp_path / "restarted.log") as (url, process):
        state = _state(url)
        assert (state["version"], state["canary"]["version"], state["canary"]["weight"]) == ("chat@1", "chat@2", 50), state
        assert httpx.get(f"{url}/admin/status").json()["drift"] == []
        assert {_chat_version(url) for _ in range(12)} == {"chat@1", "chat@2"}  # 50% each (1 in 2,048 fails by chance)
        assert httpx.post(f"{url}/admin/deployments/chat/canary/abort", json={}).status_code == 200
        (change,) = httpx.post(f"{url}/admin/reload", json={}, timeout=120).json()["changes"]
        assert (change["action"], change["status"]) == ("halted", "unchanged"), change
        restart(process)
    halted = "! chat: chat@1; the canary of chat@2 was aborted (start it again by hand, or name another version)"
    with _serving(config, port, env, tmp_path / "again.log") as (url, process):
        assert _state(url)["canary"] is None and httpx.get(f"{url}/admin/status").json()["drift"] == [halted]
        restart(process)
    third = build_tiny_model(tmp_path / "chat3", demo_model_path, seed=2)
    Registry(Path(env["BATON_HOME"])).import_folder(third, "chat", {"kind": "local"}, ImportOptions(), Change("tester"))
    config.write_text(config.read_text().replace("model: chat@2", "model: chat@3"))
    with _serving(config, port, env, tmp_path / "third.log") as (url, process):
        deadline = time.monotonic() + 120
        while (_state(url)["canary"] or {}).get("version") != "chat@3":  # the reload after start
            assert time.monotonic() < deadline, _state(url)
            time.sleep(0.2)
        assert _version(url) == "chat@1"
        reloads = [e for e in httpx.get(f"{url}/admin/models/chat/history").json() if e["actor"] == "start"]
        assert [(e["action"], e["version"]) for e in reloads] == [("canary", 3)], reloads


def _chat_version(url: str) -> str:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.headers["x-baton-version"]
