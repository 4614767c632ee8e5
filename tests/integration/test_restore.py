"""State that survives a restart, through real `baton serve` processes on one home: what the
admin API and CLI changed (a swap, a new on-demand deployment, a removal) comes back after SIGTERM and
a start with the same flags, recorded in the history; `--no-restore` starts from the flags."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from contextlib import contextmanager

import httpx
import pytest

from models.catalog import Change
from models.registry import ImportOptions, Registry
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread, build_tiny_model
from tests.fake_engine import FakeEngineFactory
from tests.integration.test_cli import BATON, _free_port, _wait_healthy


@pytest.fixture
def home(tmp_path, tiny_model_path, demo_model_path):
    """chat@1, chat@2 and chat@3 (one layout, other weights), on the transformers engine."""
    home = tmp_path / "home"
    registry = Registry(home)
    others = [build_tiny_model(tmp_path / f"v{seed}", demo_model_path, seed=seed) for seed in (1, 2)]
    for folder in (tiny_model_path, *others):
        registry.import_folder(folder, "chat", {"kind": "local"}, ImportOptions(engine_options={"engine": "transformers"}), Change("tester"))
    return home


@contextmanager
def _serving(home, tmp_path, model: str = "chat@1", *flags: str):
    port = _free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {**os.environ, "BATON_HOME": str(home)}
    command = [*BATON, "serve", "--model", model, "--name", "chat", "--port", str(port), *flags]
    with log.open("w") as output, subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env) as process:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log)
        yield url, env
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def _deployments(url: str) -> dict[str, dict]:
    return {d["name"]: d for d in httpx.get(f"{url}/admin/status").json()["deployments"]}


def test_admin_changes_come_back_after_a_restart(home, tmp_path):
    with _serving(home, tmp_path) as (url, env):
        swapped = subprocess.run([*BATON, "swap", "chat", "--to", "chat@2", "--server", url], capture_output=True, text=True, env=env, timeout=120)
        assert swapped.returncode == 0, swapped.stderr
        deployed = httpx.post(f"{url}/admin/deployments", json={"name": "docs", "model": "chat@1", "on_demand": True, "idle_ttl_s": 60}, timeout=60)
        assert deployed.status_code == 201, deployed.text
    with _serving(home, tmp_path) as (url, env):
        running = _deployments(url)
        assert running["chat"]["version"] == "chat@2"
        assert running["docs"]["on_demand"] == {"idle_ttl_s": 60.0, "version": "chat@1"}
        removed = subprocess.run([*BATON, "undeploy", "docs", "--reason", "retired", "--server", url], capture_output=True, text=True, env=env, timeout=120)
        assert removed.returncode == 0 and "remove docs chat@1 -> - (remove)" in removed.stdout and "removed: docs serves no more" in removed.stdout, removed.stdout + removed.stderr
        assert set(_deployments(url)) == {"chat"}
    restored = [event for event in Registry(home).history("chat") if event["reason"] == "restored after a restart"]
    assert restored and not [event for event in restored if event["action"] == "swap"]  # chat@2 loaded once, not chat@1 then a swap
    with _serving(home, tmp_path) as (url, _):
        assert set(_deployments(url)) == {"chat"}  # removed stays removed
    with _serving(home, tmp_path, "chat@1", "--no-restore") as (url, _):
        running = _deployments(url)
        assert set(running) == {"chat"} and running["chat"]["version"] == "chat@1"


def test_new_flags_win_over_what_was_saved_under_other_flags(home, tmp_path):
    with _serving(home, tmp_path) as (url, env):
        subprocess.run([*BATON, "swap", "chat", "--to", "chat@2", "--server", url], check=True, capture_output=True, env=env, timeout=120)
    with _serving(home, tmp_path, "chat@3") as (url, _):  # the operator's new choice, not the saved chat@2
        assert _deployments(url)["chat"]["version"] == "chat@3"


def test_a_saved_deployment_that_can_never_come_back_is_forgotten_and_others_are_kept(home, caplog):
    registry = Registry(home)
    state = {"on_demand": True, "idle_ttl_s": 60.0, "smoke_prompts": None, "health": {}, "engine_overrides": {}, "started_as": None}
    registry.save_deployment("docs", {**state, "version": "chat@2"})
    registry.save_deployment("gone", {**state, "version": "chat@9"})  # a version deleted since
    registry.save_deployment("chat", {**state, "on_demand": False, "version": "chat@9", "started_as": "chat@1"})  # the flags' deployment
    registry.save_deployment("Bad Name", {**state, "version": "chat@1"})  # saved before names were checked
    version = registry.resolve("chat@1")
    settings = Settings(home=home, models=[ModelSpec(name="chat", path=version.path, version=version.ref, engine="transformers")])
    with caplog.at_level(logging.WARNING), ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        running = _deployments(server.url)
        assert set(running) == {"chat", "docs"} and running["chat"]["version"] == "chat@1"
    assert set(registry.saved_deployments()) == {"docs"}
    assert "forgot saved deployment gone" in caplog.text and "forgot saved deployment Bad Name" in caplog.text


def test_a_canary_comes_back_beside_its_version_and_not_beside_another(home, tmp_path):
    with _serving(home, tmp_path) as (url, _):
        started = httpx.post(f"{url}/admin/deployments/chat/canary", json={"to": "chat@2", "weight": 30, "mirror": 50, "analysis": {"promote_after_s": 3600}}, timeout=60)
        assert started.status_code == 200, started.text
    with _serving(home, tmp_path) as (url, _):
        canary = _deployments(url)["chat"]["canary"]
        assert (canary["version"], canary["weight"], canary["mirror"], canary["analysis"]["promote_after_s"]) == ("chat@2", 30, 50, 3600)
    with _serving(home, tmp_path, "chat@3") as (url, _):  # another version named at start: no canary of chat@1's
        assert _deployments(url)["chat"]["canary"] is None
