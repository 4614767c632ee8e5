"""A canary's mirror through a real server: copies of the requests the active version serves
reach the canary (real engines: the tiny model's two versions), no client reads a word of
them, nothing stateful is copied, and the canary's analysis judges it on its copies alone."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing

import httpx
import pytest

from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread
from tests.fake_engine import FakeBehaviour, FakeEngineFactory

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


def _spec(home) -> ModelSpec:
    version = Registry(home).resolve("chat@1")
    return ModelSpec(name="chat", path=version.path, version=version.ref, engine="transformers")


def _metric(server, name: str, **labels) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_mirror_only_canary_gets_copies_that_no_client_sees_and_that_keep_nothing(two_versions_home):
    home = two_versions_home()
    with ServerThread(Settings(home=home, models=[_spec(home)])) as server:
        started = httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@2", "weight": 0, "mirror": 100}, timeout=120)
        assert started.status_code == 200, started.text
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"]["mirror"] == 100
        client = server.client()
        answers = [
            client.chat.completions.with_raw_response.create(**CHAT),
            client.chat.completions.with_raw_response.create(**CHAT, stream=True, stream_options={"include_usage": True}),
            client.completions.with_raw_response.create(model="chat", prompt="The sea is", max_tokens=3),
            client.chat.completions.with_raw_response.create(**CHAT, store=True),
            client.responses.with_raw_response.create(model="chat", input="hi", max_output_tokens=3),
            server.anthropic_client().messages.with_raw_response.create(model="chat", max_tokens=3, messages=[{"role": "user", "content": "hi"}]),
            client.embeddings.with_raw_response.create(model="chat", input=["The sea", "is deep"]),
            httpx.post(f"{server.url}/v1/score", json={"model": "chat", "queries": ["sea"], "documents": ["ocean", "desert"]}),
            httpx.post(f"{server.url}/rerank", json={"model": "chat", "query": "sea", "documents": ["ocean", "desert"], "top_n": 1}),
        ]
        assert [a.headers["x-baton-version"] for a in answers] == ["chat@1"] * 9  # every client was answered by the active version
        assert answers[0].parse().model == "chat@1" and answers[6].parse().model == "chat@1"
        _wait_for(lambda: _metric(server, "baton_requests_total", version="chat@2", status="200") == 9)
        assert _metric(server, "baton_mirrored_requests_total", deployment="chat", outcome="copied") == 9
        described = httpx.get(f"{server.url}/admin/deployments/chat").json()
        assert (described["window"]["num_requests"], described["canary"]["window"]["num_requests"]) == (9, 9)  # each side's last minute
        assert described["canary"]["window"]["error_rate"] == 0.0 and described["canary"]["window"]["ttft_p95_s"] > 0
        assert [c.model for c in client.chat.completions.list()] == ["chat@1"]  # the stored completion's copy kept nothing
        kept = answers[4].parse()
        assert client.responses.retrieve(kept.id).model == "chat@1"  # kept: the original; its copy (store: false) was not
        conversation = client.conversations.create()
        client.responses.create(model="chat", input="hi", max_output_tokens=3, conversation=conversation.id)  # its answer joins the conversation: never copied
        assert len(client.conversations.items.list(conversation.id).data) == 2  # the question and one answer, the original's
        pinned = client.chat.completions.with_raw_response.create(**{**CHAT, "model": "chat@2"})  # the canary's own request: not copied again
        assert pinned.headers["x-baton-version"] == "chat@2"
        time.sleep(0.5)
        assert _metric(server, "baton_mirrored_requests_total", deployment="chat", outcome="copied") == 9
        assert _metric(server, "baton_requests_total", version="chat@2", status="200") == 10
    with closing(sqlite3.connect(home / "responses.db")) as db:  # kept: the two Responses clients asked for, no copy
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 2


@pytest.mark.parametrize(("body", "param"), [({"weight": 0}, "weight"), ({"weight": 10, "mirror": 101}, "mirror")])
def test_a_canary_that_would_serve_nothing_or_too_much_is_refused(two_versions_home, body, param):
    home = two_versions_home()
    with ServerThread(Settings(home=home, models=[_spec(home)]), engine_factory=FakeEngineFactory()) as server:
        refused = httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@2", **body}, timeout=60)
        assert refused.status_code == 400 and param in str(refused.json()["error"]["param"]), refused.text
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"] is None


def test_a_slow_version_mirrored_at_weight_0_is_aborted_by_its_analysis_before_any_client_sees_it(two_versions_home):
    """Fake engines, since the breach needs one version 1,000 times slower than the other."""
    home = two_versions_home()
    slow = Registry(home).resolve("chat@2").path.name
    factory = FakeEngineFactory({slow: FakeBehaviour(token_seconds=0.2)})
    with ServerThread(Settings(home=home, models=[_spec(home)], idle_check_s=0.1), engine_factory=factory) as server:
        canary = {"to": "chat@2", "weight": 0, "mirror": 100, "analysis": {"min_requests": 5}}
        httpx.post(f"{server.url}/admin/deployments/chat/canary", json=canary, timeout=60).raise_for_status()
        served = []
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"] is not None:
            assert time.monotonic() < deadline, "the canary was never judged"
            answer = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30)
            served.append((answer.status_code, answer.headers["x-baton-version"]))
            time.sleep(0.05)
        assert set(served) == {(200, "chat@1")}
    aborts = [e for e in Registry(home).history("chat") if e["action"] == "abort"]
    assert aborts and aborts[-1]["actor"] == "baton" and "tokens/s below" in aborts[-1]["reason"]


def test_no_copy_takes_a_clients_place_where_a_deployment_runs_one_request_at_a_time(two_versions_home):
    home = two_versions_home()
    settings = Settings(home=home, models=[_spec(home)], max_running_per_deployment=1)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@2", "weight": 0, "mirror": 100}, timeout=60).raise_for_status()
        answers = [httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30) for _ in range(3)]
        assert [(a.status_code, a.headers["x-baton-version"]) for a in answers] == [(200, "chat@1")] * 3
        assert _metric(server, "baton_mirrored_requests_total", deployment="chat", outcome="dropped") == 3  # each original held the one place
        assert _metric(server, "baton_mirrored_requests_total", deployment="chat", outcome="copied") == 0
