"""Keys as the operator gives them: the key file's errors, and keys that could not be told
apart (one name twice, or one secret for two keys) refused before the server starts."""

import json

import pytest
from pydantic import ValidationError

from models.errors import ConfigError
from server.config.settings import Settings
from server.auth.keys import authorize, is_open, key, load_key_file, priority_of


def _settings(tmp_path, **keys) -> Settings:
    return Settings(home=tmp_path, memory_budget_bytes=1, standby_host_budget_bytes=0, **keys)


def test_two_keys_of_one_name_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="two keys are named 'ops'"):
        _settings(tmp_path, keys=[key("ops", "one", {"admin"}), key("ops", "two", {"inference"})])


@pytest.mark.parametrize(
    "keys",
    [
        {"api_key": "same", "admin_key": "same"},
        {"api_key": "same", "keys": [key("ops", "same", {"admin"})]},
        {"keys": [key("app", "same", {"inference"}), key("ops", "same", {"admin"})]},
    ],
)
def test_one_secret_for_two_keys_is_refused(tmp_path, keys):
    """Which key a request holds would depend on the order of the keys: with the same
    secret as --api-key and --admin-key, /v1 answered 403 (the admin key matched)."""
    with pytest.raises(ValidationError, match="have the same secret"):
        _settings(tmp_path, **keys)


def test_distinct_keys_each_keep_their_scopes(tmp_path):
    settings = _settings(tmp_path, api_key="app-secret", admin_key="ops-secret")
    assert authorize(settings.all_keys(), "inference", "app-secret", is_local=True).name == "api-key"
    assert authorize(settings.all_keys(), "admin", "ops-secret", is_local=False).name == "admin-key"


def test_a_key_file_error_names_the_entry(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "app", "key_env": "APP_KEY", "scopes": ["inference", "root"]}]))
    with pytest.raises(ConfigError, match=r"key 0: scopes.1: Input should be"):
        load_key_file(path, {"APP_KEY": "s"})
    path.write_text(json.dumps([{"name": "app", "key_env": "APP_KEY", "scopes": ["inference"]}]))
    with pytest.raises(ConfigError, match="APP_KEY is not set"):
        load_key_file(path, {})
    assert [spec.name for spec in load_key_file(path, {"APP_KEY": "s"})] == ["app"]


def test_a_request_may_wait_longer_than_its_key_allows_never_less(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "batch", "key_env": "BATCH_KEY", "scopes": ["inference"], "priority": 10}]))
    (batch,) = load_key_file(path, {"BATCH_KEY": "s"})
    assert (priority_of(batch, 0), priority_of(batch, -100), priority_of(batch, 20)) == (10, 10, 20)
    assert (priority_of(None, -5), priority_of(None, 3)) == (0, 3)  # no key: none sooner than 0
    assert priority_of(key("ops", "t", {"inference"}, priority=-5), -2) == -2


def test_a_scope_no_key_has_is_open_and_one_any_key_has_is_not():
    keys = [key("app", "secret", {"inference"})]
    assert not is_open(keys, "inference") and is_open(keys, "admin") and is_open([], "inference")
