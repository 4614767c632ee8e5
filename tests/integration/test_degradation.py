"""Degradation through a real server: a version that slows down is rolled back, one that
fails sends its traffic to a fallback (with a webhook alert), a wrong golden answer alerts."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from server.deployments.health import Baseline, GoldenPrompt, HealthPolicy, Slo
from tests.conftest import ServerThread
from tests.fake_engine import FakeBehaviour, FakeEngineFactory

ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def home(two_versions_home):
    return two_versions_home()


def _spec(home, name: str, ref: str, health: HealthPolicy | None = None) -> ModelSpec:
    version = Registry(home).resolve(ref)
    return ModelSpec(name=name, path=version.path, version=version.ref, health=health or HealthPolicy())


def _wait_for(condition, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _alerts(server, **labels) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("baton_degradation_alerts_total{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_version_that_slows_down_is_rolled_back_without_losing_a_request(home):
    slow = Registry(home).resolve("chat@2").path.name
    factory = FakeEngineFactory({slow: FakeBehaviour(token_seconds=0.1)})
    policy = HealthPolicy(slo=Slo(max_ttft_p95_s=0.05, min_requests=5), on_breach="rollback")
    with ServerThread(Settings(home=home, models=[_spec(home, "chat", "chat@1", policy)], idle_check_s=0.1), engine_factory=factory) as server:
        httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@2", "strategy": "blue-green"}, timeout=60).raise_for_status()
        statuses = [httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **ASK}, timeout=30).status_code for _ in range(8)]
        _wait_for(lambda: httpx.get(f"{server.url}/admin/deployments/chat").json()["version"] == "chat@1")
        assert statuses == [200] * 8
        assert _alerts(server, deployment="chat", reason="ttft", action="rollback") == 1
    rollbacks = [e for e in Registry(home).history("chat") if e["action"] == "rollback"]
    assert rollbacks and rollbacks[-1]["reason"].startswith("degradation: TTFT p95")


def test_an_automatic_rollback_that_fails_is_logged_and_the_version_serves_on(two_versions_home, caplog):
    home = two_versions_home()  # its own: the version it ends on is saved, and would be restored by the next test
    slow = Registry(home).resolve("chat@2").path.name
    factory = FakeEngineFactory({slow: FakeBehaviour(token_seconds=0.1, fails_to_reload=True)})
    policy = HealthPolicy(slo=Slo(max_ttft_p95_s=0.05, min_requests=5), on_breach="rollback")
    settings = Settings(home=home, models=[_spec(home, "chat", "chat@1", policy)], idle_check_s=0.1, keep_standby=False)
    with ServerThread(settings, engine_factory=factory) as server:
        httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@2", "strategy": "blue-green"}, timeout=60).raise_for_status()
        for _ in range(8):
            httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **ASK}, timeout=30)
        _wait_for(lambda: any("automatic rollback of chat failed" in record.getMessage() for record in caplog.records))
        assert httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **ASK}, timeout=30).headers["x-baton-version"] == "chat@2"


def test_a_health_check_that_fails_once_does_not_end_the_watch(home, monkeypatch):
    from server.deployments import health_watch

    calls, verdict = [], health_watch.breaches

    def fails_first(stats, slo):
        calls.append(stats)
        if len(calls) == 1:
            raise RuntimeError("a check that fails")
        return verdict(stats, slo)

    monkeypatch.setattr(health_watch, "breaches", fails_first)
    faulty = Registry(home).resolve("chat@1").path.name
    policy = HealthPolicy(slo=Slo(max_error_rate=0.2, min_requests=3))
    with ServerThread(Settings(home=home, models=[_spec(home, "chat", "chat@1", policy)], idle_check_s=0.1), engine_factory=FakeEngineFactory({faulty: FakeBehaviour(fails_requests=True)})) as server:
        for _ in range(3):
            httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **ASK}, timeout=30)
        _wait_for(lambda: _alerts(server, deployment="chat", reason="error_rate", action="alert") == 1)
    assert len(calls) > 1


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failing_deployment_sends_its_traffic_to_a_fallback_and_posts_an_alert(home):
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    faulty = Registry(home).resolve("chat@1").path.name
    factory = FakeEngineFactory({faulty: FakeBehaviour(fails_requests=True)})
    policy = HealthPolicy(
        slo=Slo(max_error_rate=0.2, min_requests=3), on_breach="fallback", fallbacks=["backup"], webhook_url=f"http://127.0.0.1:{hook.server_port}/alerts"
    )
    models = [_spec(home, "chat", "chat@1", policy), _spec(home, "backup", "chat@2")]
    try:
        with ServerThread(Settings(home=home, models=models, idle_check_s=0.1), engine_factory=factory) as server:
            ask = lambda stream=False: httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **ASK, "stream": stream}, timeout=30)  # noqa: E731
            failed = [ask(stream) for stream in (False, True, False)]  # the faulty version, before the verdict
            assert [(r.status_code, r.json()["error"]["type"]) for r in failed] == [(500, "server_error")] * 3  # a stream too: no 200 before a token
            _wait_for(lambda: httpx.get(f"{server.url}/admin/deployments/chat").json()["is_breaching"])
            served = ask()
            assert served.status_code == 200
            assert (served.headers["x-baton-fallback-from"], served.headers["x-baton-deployment"], served.headers["x-baton-version"]) == ("chat", "backup", "chat@2")
            _wait_for(lambda: _Hook.received)
    finally:
        hook.shutdown()
        hook.server_close()
    alert = _Hook.received[-1]
    assert (alert["deployment"], alert["action"]) == ("chat", "fallback") and alert["breaches"][0].startswith("error rate 100.0%")


def test_a_golden_prompt_with_a_wrong_answer_raises_an_alert(home):
    policy = HealthPolicy(golden_prompts=[GoldenPrompt(prompt="What is the capital of France?", expect="Paris")], golden_interval_s=0.2)
    with ServerThread(Settings(home=home, models=[_spec(home, "chat", "chat@1", policy)], idle_check_s=0.1), engine_factory=FakeEngineFactory()) as server:
        _wait_for(lambda: _alerts(server, deployment="chat", reason="golden_prompt", action="alert") >= 1)
        time.sleep(0.5)  # several health ticks: an SLO check (there is none) must not clear a golden breach
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["is_breaching"]
        assert _alerts(server, deployment="chat", reason="golden_prompt", action="alert") == 1  # alerted once, not at every check
        assert httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **ASK}, timeout=30).status_code == 200  # an alert only: still served


def test_a_version_that_slows_against_its_own_baseline_raises_an_alert(home):
    factory = FakeEngineFactory(default=FakeBehaviour(token_seconds=0.01))
    policy = HealthPolicy(baseline=Baseline(after_s=0.3, ttft_factor=3.0, min_requests=5))
    with ServerThread(Settings(home=home, models=[_spec(home, "chat", "chat@1", policy)], idle_check_s=0.1), engine_factory=factory) as server:
        ask = lambda: httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **ASK}, timeout=30).status_code  # noqa: E731
        assert [ask() for _ in range(6)] == [200] * 6
        _wait_for(lambda: httpx.get(f"{server.url}/admin/deployments/chat").json()["baseline"] is not None)
        factory.built[0]._behaviour = FakeBehaviour(token_seconds=0.2)  # the same version, now slow
        assert [ask() for _ in range(6)] == [200] * 6
        _wait_for(lambda: _alerts(server, deployment="chat", reason="ttft", action="alert") == 1)


# Fake engines answer in about a millisecond, where the ratios of two versions' timings are
# noise: these canaries are judged by their error rate.
LENIENT = {"min_requests": 5, "ttft_factor": 1000, "tokens_per_s_factor": 0.001}


def _ask_each(server, versions: dict[str, int]) -> list[int]:
    return [httpx.post(f"{server.url}/v1/chat/completions", json={"model": version, **ASK}, timeout=30).status_code for version, count in versions.items() for _ in range(count)]


def test_a_canary_that_fails_its_analysis_is_aborted_and_the_active_version_is_untouched(two_versions_home):
    """A canary 1,000 times slower than the active version: its tokens/s breach (fake engines
    differ in nothing else a smoke check lets through)."""
    home = two_versions_home()
    slow = Registry(home).resolve("chat@2").path.name
    factory = FakeEngineFactory({slow: FakeBehaviour(token_seconds=0.3)})
    with ServerThread(Settings(home=home, models=[_spec(home, "chat", "chat@1")], idle_check_s=0.1), engine_factory=factory) as server:
        started = httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@2", "weight": 20, "analysis": {"min_requests": 5}}, timeout=60)
        assert started.status_code == 200, started.text
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"]["analysis"]["min_requests"] == 5
        assert _ask_each(server, {"chat@1": 6, "chat@2": 5}) == [200] * 11
        _wait_for(lambda: httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"] is None)
        deployment = httpx.get(f"{server.url}/admin/deployments/chat").json()
        assert (deployment["version"], deployment["is_breaching"]) == ("chat@1", False)  # the canary's numbers were its own
        assert _alerts(server, deployment="chat", reason="tokens_per_s", action="abort_canary") == 1
    aborts = [e for e in Registry(home).history("chat") if e["action"] == "abort"]
    assert aborts and aborts[-1]["actor"] == "baton" and aborts[-1]["reason"].startswith("canary analysis: ")
    assert "tokens/s below" in aborts[-1]["reason"]


def test_a_canary_within_objectives_moves_through_its_steps_then_is_promoted(two_versions_home):
    home = two_versions_home()
    with ServerThread(Settings(home=home, models=[_spec(home, "chat", "chat@1")], idle_check_s=0.1), engine_factory=FakeEngineFactory()) as server:
        analysis = {**LENIENT, "promote_after_s": 0.5, "steps": [40]}
        refused = httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@2", "weight": 50, "analysis": analysis}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "analysis.steps"  # steps go up from the weight
        httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@2", "weight": 20, "analysis": analysis}, timeout=60).raise_for_status()
        assert _ask_each(server, {"chat@1": 6, "chat@2": 6}) == [200] * 12
        _wait_for(lambda: httpx.get(f"{server.url}/admin/deployments/chat").json()["version"] == "chat@2")
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"] is None
    moves = [(e["action"], e["reason"]) for e in Registry(home).history("chat") if e["actor"] == "baton"]
    assert moves == [("step", "canary analysis: within objectives for 0.5 s at 20%"), ("promote", "canary analysis: within objectives for 0.5 s at 40%")]


def test_a_canary_that_answers_a_golden_prompt_wrongly_is_aborted(two_versions_home):
    """Fake engines answer with their version's label: the golden prompt expects chat@1's."""
    home = two_versions_home()
    label = Registry(home).resolve("chat@1").path.name[:8]
    policy = HealthPolicy(golden_prompts=[GoldenPrompt(prompt="Who are you?", expect=f"^{label}")], golden_interval_s=0.2)
    with ServerThread(Settings(home=home, models=[_spec(home, "chat", "chat@1", policy)], idle_check_s=0.1), engine_factory=FakeEngineFactory()) as server:
        httpx.post(f"{server.url}/admin/deployments/chat/canary", json={"to": "chat@2", "weight": 10, "analysis": {}}, timeout=60).raise_for_status()
        _wait_for(lambda: httpx.get(f"{server.url}/admin/deployments/chat").json()["canary"] is None)
        assert not httpx.get(f"{server.url}/admin/deployments/chat").json()["is_breaching"]  # the active version answers right
        assert _alerts(server, deployment="chat", reason="golden_prompt", action="abort_canary") == 1
    aborts = [e for e in Registry(home).history("chat") if e["action"] == "abort"]
    assert aborts and aborts[-1]["reason"].startswith("canary analysis: golden prompt 0 answered")
