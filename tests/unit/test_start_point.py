"""Where a deployment named at start-up starts, given what it served before a restart."""

from server.deployments.manager import start_point

SAVED = {"version": "chat@2", "engine_overrides": {"max_model_len": 512}, "started_as": "chat@1"}


def test_the_same_flags_start_where_the_last_run_ended():
    assert start_point("chat@1", {}, SAVED) == ("chat@2", {"max_model_len": 512})


def test_new_flags_win():
    assert start_point("chat@3", {"engine": "vllm"}, SAVED) == ("chat@3", {"engine": "vllm"})


def test_nothing_saved_starts_from_the_flags():
    assert start_point("chat@1", {}, None) == ("chat@1", {})
    assert start_point("chat@1", {}, {"version": "chat@2"}) == ("chat@1", {})  # saved before started_as was kept
