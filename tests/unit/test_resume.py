"""What a restart brings back: where a deployment named at start-up starts, and which saved
deployments come back with flags or with a config file."""

from pathlib import Path

from server.config.settings import ModelSpec
from server.deployments.resume import start_point, to_restore

SAVED = {"version": "chat@2", "engine_overrides": {"max_model_len": 512}, "started_as": "chat@1"}


def test_the_same_flags_start_where_the_last_run_ended():
    assert start_point("chat@1", {}, SAVED) == ("chat@2", {"max_model_len": 512})


def test_new_flags_win():
    assert start_point("chat@3", {"engine": "vllm"}, SAVED) == ("chat@3", {"engine": "vllm"})


def test_nothing_saved_starts_from_the_flags():
    assert start_point("chat@1", {}, None) == ("chat@1", {})
    assert start_point("chat@1", {}, {"version": "chat@2"}) == ("chat@1", {})  # saved before started_as was kept


def test_a_rollout_resumes_from_what_it_served_whatever_the_file_names_now():
    assert start_point("chat@3", {"engine": "vllm"}, SAVED, resumes_rollout=True) == ("chat@2", {"max_model_len": 512})
    assert start_point("chat@3", {}, None, resumes_rollout=True) == ("chat@3", {})


def _spec(name: str, version: str, **fields) -> ModelSpec:
    return ModelSpec(name=name, path=Path("/models") / name, version=version, **fields)


def _saved(version: str, canary: str | None = None, on_demand: bool = False) -> dict:
    return {"version": version, "on_demand": on_demand, "canary": {"version": canary, "weight": 25, "analysis": None} if canary else None}


def test_flags_bring_back_every_saved_deployment():
    saved = {"chat": _saved("chat@1", canary="chat@2"), "docs": _saved("docs@1")}
    assert to_restore(saved, [_spec("chat", "chat@1")], from_file=False) == saved


def test_a_config_file_brings_back_only_its_rollouts_with_the_canary_of_the_files_version():
    saved = {"chat": _saved("chat@1", canary="chat@2"), "docs": _saved("docs@1"), "gone": _saved("gone@1")}
    specs = [_spec("chat", "chat@2", rolls_out=True), _spec("docs", "docs@2")]
    assert to_restore(saved, specs, from_file=True) == {"chat": saved["chat"]}


def test_a_canary_of_a_version_the_file_no_longer_names_is_not_brought_back():
    saved = {"chat": _saved("chat@1", canary="chat@2")}
    assert to_restore(saved, [_spec("chat", "chat@3", rolls_out=True)], from_file=True) == {"chat": _saved("chat@1")}


def test_an_on_demand_deployment_starts_as_the_file_says():
    saved = {"chat": _saved("chat@1", on_demand=True), "docs": _saved("docs@1")}
    specs = [_spec("chat", "chat@2", rolls_out=True), _spec("docs", "docs@2", rolls_out=True, on_demand=True)]
    assert to_restore(saved, specs, from_file=True) == {}
