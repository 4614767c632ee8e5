"""/metrics through a real server: series appear and move with traffic and swaps; request
ids; one JSON log line per request."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from server.auth.keys import key
from tests.conftest import ServerThread
from tests.fake_engine import FakeEngineFactory

HI = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def server(two_versions_home):
    home = two_versions_home()
    first = Registry(home).resolve("chat@1")
    settings = Settings(home=home, models=[ModelSpec(name="chat", path=first.path, version=first.ref)])
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as running:
        yield running


def _scrape(server) -> str:
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


def _value(text: str, name: str, **labels) -> float:
    """The sample `name{labels...}` (labels in any order; others may be present), or 0."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_requests_move_the_counters_and_histograms(server):
    before = _scrape(server)
    client = server.client()
    for _ in range(3):
        client.chat.completions.create(**HI)
    list(client.chat.completions.create(**HI, stream=True))
    with pytest.raises(Exception):
        client.chat.completions.create(**{**HI, "max_tokens": 10**6})  # 400: more than the context
    after = _scrape(server)
    labels = {"deployment": "chat", "version": "chat@1"}
    assert _value(after, "baton_requests_total", status="200", **labels) - _value(before, "baton_requests_total", status="200", **labels) == 4
    assert _value(after, "baton_requests_total", status="400", **labels) - _value(before, "baton_requests_total", status="400", **labels) == 1
    assert _value(after, "baton_time_to_first_token_seconds_count", **labels) - _value(before, "baton_time_to_first_token_seconds_count", **labels) == 4
    assert _value(after, "baton_completion_tokens_total", **labels) - _value(before, "baton_completion_tokens_total", **labels) == 12
    assert _value(after, "baton_request_duration_seconds_count", **labels) - _value(before, "baton_request_duration_seconds_count", **labels) == 5
    # the 400 was refused while its prompt was read: only the four answered were ready for the engine
    assert _value(after, "baton_prepare_seconds_count", deployment="chat") - _value(before, "baton_prepare_seconds_count", deployment="chat") == 4
    assert _value(after, "baton_slot_state", deployment="chat", role="active", state="ready") == 1
    assert "process_resident_memory_bytes" in after and "baton_requests_in_flight" in after
    assert "_created" not in after  # no creation-time series beside every counter and histogram


def test_a_swap_moves_the_swap_counter_and_its_phase_histograms(server):
    before = _scrape(server)
    httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@2", "strategy": "reload"}, timeout=60).raise_for_status()
    httpx.post(f"{server.url}/admin/deployments/chat/rollback", json={}, timeout=60).raise_for_status()
    after = _scrape(server)
    swaps = {"deployment": "chat", "strategy": "reload", "outcome": "succeeded"}
    assert _value(after, "baton_swaps_total", action="swap", **swaps) - _value(before, "baton_swaps_total", action="swap", **swaps) == 1
    assert _value(after, "baton_swaps_total", action="rollback", **swaps) - _value(before, "baton_swaps_total", action="rollback", **swaps) == 1
    phase = {"action": "swap", "strategy": "reload", "phase": "reload"}
    assert _value(after, "baton_swap_phase_duration_seconds_count", **phase) - _value(before, "baton_swap_phase_duration_seconds_count", **phase) == 1


def test_labels_stay_bounded_an_unknown_model_makes_no_series(server):
    httpx.post(f"{server.url}/v1/chat/completions", json={**HI, "model": "no-such-model-1234"})
    assert "no-such-model-1234" not in _scrape(server)


def test_request_ids_are_echoed_or_made_and_each_request_logs_one_json_line(server, caplog):
    with caplog.at_level(logging.INFO, logger="baton.requests"):
        given = httpx.post(f"{server.url}/v1/chat/completions", json=HI, headers={"x-request-id": "client-abc.1"})
        made = httpx.post(f"{server.url}/v1/chat/completions", json=HI, headers={"x-request-id": "bad id with spaces"})
    assert given.headers["x-request-id"] == "client-abc.1"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    lines = [r.msg for r in caplog.records if r.name == "baton.requests"]
    assert [line["request_id"] for line in lines] == ["client-abc.1", made.headers["x-request-id"]]
    assert set(lines[0]) == {"event", "request_id", "deployment", "version", "status", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "ttft_s", "duration_s"}
    assert "hi" not in str(lines)  # never the prompt


def test_metrics_can_be_closed_to_all_but_a_metrics_key(tiny_model_path, tmp_path):
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], metrics_need_key=True, keys=[key("prom", "scrape", {"metrics"})])
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer scrape"}).status_code == 200


def test_the_grafana_dashboard_queries_only_metrics_that_baton_exports(server):
    """Every metric name in docker/grafana-dashboard.json's queries appears in /metrics (GPU
    series are checked against the monitor's own names: this machine has no GPU)."""
    import json
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[2] / "docker" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + [a["expr"] for a in dashboard["annotations"]["list"]]
    names = {n for q in queries for n in re.findall(r"\b(baton_[a-z_]+)", q)}
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", _scrape(server), re.M))
    exported_names = {name for name, kind in exported} | {f"{name}_{suffix}" for name, kind in exported if kind == "histogram" for suffix in ("bucket", "count", "sum")}
    exported_names |= {f"{name}_total" for name, kind in exported if kind == "counter"}
    gpu_names = set(re.findall(r'"(baton_gpu_[a-z_]+)"', (Path(__file__).parents[2] / "server" / "observability" / "gpu_monitor.py").read_text()))
    assert names and names <= exported_names | gpu_names, names - exported_names - gpu_names


def test_without_request_metrics_requests_are_served_and_nothing_is_noted(tiny_model_path, tmp_path):
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], request_metrics=False)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        assert httpx.post(f"{server.url}/v1/chat/completions", json=HI).status_code == 200
        assert _value(_scrape(server), "baton_requests_total", deployment="chat") == 0
