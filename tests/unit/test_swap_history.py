"""The swap history: records by id, bounded, and every finished one in the registry's
history and the metrics (a real SQLite registry on disk)."""

from __future__ import annotations

import pytest

from models.errors import NotFoundError
from models.registry import Registry
from server.deployments import swap_history
from server.deployments.swap_history import SwapHistory
from server.deployments.swap_record import SwapRecord
from server.observability.metrics import Metrics


def _record(to_version: str = "chat@2") -> SwapRecord:
    return SwapRecord("chat", "swap", "chat@1", to_version, "reload", "tester", "test")


def test_swap_history_keeps_a_running_record_visible_by_id(tmp_path):
    history = SwapHistory(Registry(tmp_path), Metrics())
    record = _record()
    history.add(record)
    assert history.get(record.id) is record and record.status == "running"
    with pytest.raises(NotFoundError):
        history.get("swap-unknown")


def test_swap_history_forgets_the_oldest_past_its_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(swap_history, "MAX_RECORDS", 3)
    history = SwapHistory(Registry(tmp_path), Metrics())
    records = [_record() for _ in range(5)]
    for record in records:
        history.add(record)
    with pytest.raises(NotFoundError):
        history.get(records[1].id)
    assert [history.get(r.id) for r in records[2:]] == records[2:]


def test_swap_history_writes_a_finished_record_to_the_registry_and_the_metrics(tmp_path):
    registry, metrics = Registry(tmp_path), Metrics()
    history = SwapHistory(registry, metrics)
    record = _record("chat@7")
    history.add_finished(record)
    [event] = registry.history("chat")
    assert (event["action"], event["version"], event["details"]["id"]) == ("swap", 7, record.id)
    assert record.status == "succeeded"
    assert metrics.registry.get_sample_value("baton_swaps_total", {"deployment": "chat", "action": "swap", "strategy": "reload", "outcome": "succeeded"}) == 1
