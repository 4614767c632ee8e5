"""The auth matrix: every kind of route against every kind of caller, through a real server."""

from __future__ import annotations

import json

import httpx
import pytest

from server.config.settings import ModelSpec, Settings
from server.auth.keys import hash_key, key, load_key_file
from models.errors import ConfigError
from tests.conftest import ServerThread
from tests.fake_engine import FakeEngineFactory

CALLERS = {
    "none": None,
    "wrong": "not-a-key",
    "inference": "inference-secret",
    "admin": "admin-secret",
    "other-deployment": "other-secret",
}
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ROUTES = {  # name: (method, path, body)
    "health": ("GET", "/health", None),
    "ready": ("GET", "/ready", None),
    "models": ("GET", "/v1/models", None),
    "chat": ("POST", "/v1/chat/completions", {"model": "chat", **HI}),
    "completion": ("POST", "/v1/completions", {"model": "chat", "prompt": "hi", "max_tokens": 2}),
    "pinned": ("POST", "/v1/chat/completions", {"model": "chat@1", **HI}),
    "tokenize": ("POST", "/tokenize", {"model": "chat", "prompt": "hi"}),
    "rerank": ("POST", "/rerank", {"model": "chat", "query": "hi", "documents": ["hello"]}),
    "response": ("GET", "/v1/responses/resp_nosuch", None),
    "conversation": ("GET", "/v1/conversations/conv_nosuch", None),
    "files": ("GET", "/v1/files", None),
    "stored-completion": ("GET", "/v1/chat/completions/chatcmpl-nosuch", None),
    "batch": ("GET", "/v1/batches/batch_nosuch", None),
    "admin-status": ("GET", "/admin/status", None),
    "admin-models": ("GET", "/admin/models", None),
    "admin-swap": ("POST", "/admin/deployments/chat/swap", {"to": "nosuch@1"}),
}
# What each caller gets on each route; admin-swap's 404 is the unknown version, and rerank's 400
# the fake engine that makes no embeddings: they got past auth.
# `pinned` names a version nothing serves: 404 for a key that may call every deployment, 403
# for one limited to others (it learns nothing of what is served beyond its own).
EXPECTED = {
    "health": {"none": 200, "wrong": 200, "inference": 200, "admin": 200, "other-deployment": 200},
    "ready": {"none": 200, "wrong": 200, "inference": 200, "admin": 200, "other-deployment": 200},
    "models": {"none": 401, "wrong": 401, "inference": 200, "admin": 403, "other-deployment": 200},
    "chat": {"none": 401, "wrong": 401, "inference": 200, "admin": 403, "other-deployment": 403},
    "completion": {"none": 401, "wrong": 401, "inference": 200, "admin": 403, "other-deployment": 403},
    "pinned": {"none": 401, "wrong": 401, "inference": 404, "admin": 403, "other-deployment": 403},
    "tokenize": {"none": 401, "wrong": 401, "inference": 200, "admin": 403, "other-deployment": 403},
    "rerank": {"none": 401, "wrong": 401, "inference": 400, "admin": 403, "other-deployment": 403},
    "response": {"none": 401, "wrong": 401, "inference": 404, "admin": 403, "other-deployment": 404},
    "conversation": {"none": 401, "wrong": 401, "inference": 404, "admin": 403, "other-deployment": 404},
    "files": {"none": 401, "wrong": 401, "inference": 200, "admin": 403, "other-deployment": 200},
    "stored-completion": {"none": 401, "wrong": 401, "inference": 404, "admin": 403, "other-deployment": 404},
    "batch": {"none": 401, "wrong": 401, "inference": 404, "admin": 403, "other-deployment": 404},
    "admin-status": {"none": 401, "wrong": 401, "inference": 403, "admin": 200, "other-deployment": 403},
    "admin-models": {"none": 401, "wrong": 401, "inference": 403, "admin": 200, "other-deployment": 403},
    "admin-swap": {"none": 401, "wrong": 401, "inference": 403, "admin": 404, "other-deployment": 403},
}


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    keys = [
        key("app", CALLERS["inference"], {"inference"}),
        key("ops", CALLERS["admin"], {"admin"}),
        key("other", CALLERS["other-deployment"], {"inference"}, {"other"}),
    ]
    settings = Settings(home=tmp_path_factory.mktemp("auth"), models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as running:
        yield running


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("caller", CALLERS)
def test_every_route_gives_every_caller_the_right_status(server, route, caller):
    method, path, body = ROUTES[route]
    headers = {"authorization": f"Bearer {CALLERS[caller]}"} if CALLERS[caller] else {}
    response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
    assert response.status_code == EXPECTED[route][caller], response.text
    if response.status_code in (401, 403):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert CALLERS[caller] is None or CALLERS[caller] not in response.text  # a secret is never echoed


def test_a_kept_response_is_its_keys_alone_and_outlives_a_restart(tiny_model_path, tmp_path):
    """Another key's response is as unknown as one never made, to read, continue or delete."""
    keys = [key("app", "app-secret", {"inference"}), key("intruder", "intruder-secret", {"inference"})]
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    ask = {"model": "chat", "input": "hi", "max_output_tokens": 2}
    as_app, as_intruder = ({"authorization": f"Bearer {secret}"} for secret in ("app-secret", "intruder-secret"))
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        made = httpx.post(f"{server.url}/v1/responses", json=ask, headers=as_app, timeout=30).json()
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        path = f"{server.url}/v1/responses/{made['id']}"
        assert httpx.get(path, headers=as_app).json() == made
        refused = [
            httpx.get(path, headers=as_intruder),
            httpx.delete(path, headers=as_intruder),
            httpx.post(f"{server.url}/v1/responses", json={**ask, "previous_response_id": made["id"]}, headers=as_intruder, timeout=30),
        ]
        assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(404, "response_not_found")] * 3
        assert httpx.post(f"{server.url}/v1/responses", json={**ask, "previous_response_id": made["id"]}, headers=as_app, timeout=30).status_code == 200


def test_a_server_that_keeps_no_responses_says_so(tiny_model_path, tmp_path):
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], store_responses=False)
    ask = {"model": "chat", "input": "hi", "max_output_tokens": 2}
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        made = httpx.post(f"{server.url}/v1/responses", json=ask, timeout=30).json()
        assert made["store"] is False and httpx.get(f"{server.url}/v1/responses/{made['id']}").status_code == 404
        for field, value in (("store", True), ("previous_response_id", made["id"])):
            refused = httpx.post(f"{server.url}/v1/responses", json={**ask, field: value}, timeout=30)
            assert (refused.status_code, refused.json()["error"]["param"]) == (400, field)
    assert not (tmp_path / "home" / "responses.db").exists()


def test_a_deployment_scoped_key_lists_only_its_deployments(server):
    response = httpx.get(f"{server.url}/v1/models", headers={"authorization": f"Bearer {CALLERS['other-deployment']}"})
    assert response.json()["data"] == []


def test_key_file_takes_secrets_from_the_environment_or_as_hashes(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([
        {"name": "app", "key_env": "APP_KEY", "scopes": ["inference"], "deployments": ["chat"]},
        {"name": "ops", "key_sha256": hash_key("ops-secret"), "scopes": ["admin", "inference"]},
    ]))
    app, ops = load_key_file(path, {"APP_KEY": "app-secret"})
    assert (app.sha256, app.deployments, ops.scopes) == (hash_key("app-secret"), frozenset({"chat"}), frozenset({"admin", "inference"}))
    assert "app-secret" not in path.read_text() + repr(app)


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([{"name": "app", "scopes": ["inference"]}], "exactly one of key_env"),
        ([{"name": "app", "key_env": "UNSET_VAR", "scopes": ["inference"]}], "UNSET_VAR is not set"),
        ([{"name": "app", "key_sha256": "0" * 64, "scopes": ["root"]}], "key 0: scopes.0"),
        ([{"name": "app", "key_sha256": "xyz", "scopes": ["admin"]}], "key 0 (app)"),
        ({"name": "app"}, "must hold a JSON list"),
    ],
)
def test_a_bad_key_file_is_refused_naming_the_entry(tmp_path, entries, words):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_key_file(path, {})



def test_anthropic_routes_refuse_in_anthropics_shape(server):
    """What the anthropic SDK reads: `error.type` says which refusal it is."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for caller, status, kind in (("none", 401, "authentication_error"), ("admin", 403, "permission_error"), ("other-deployment", 403, "permission_error")):
        headers = {"authorization": f"Bearer {CALLERS[caller]}"} if CALLERS[caller] else {}
        refused = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers, timeout=30)
        assert refused.status_code == status and refused.json()["type"] == "error", refused.text
        assert refused.json()["error"]["type"] == kind and refused.json()["error"]["message"], refused.text
    answered = httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": CALLERS["inference"]}, timeout=30)
    assert answered.status_code == 200, answered.text  # the anthropic SDK sends its key as x-api-key
