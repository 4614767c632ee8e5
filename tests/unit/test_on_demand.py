"""Which on-demand deployment may be unloaded: pure decisions over deployments and slots."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from server.deployments.deployment import Canary, Deployment, OnDemand
from server.deployments.on_demand import is_idle_past_ttl, least_recently_used_idle
from server.deployments.slot import Slot, SlotState, Target
from tests.fake_engine import FakeBehaviour, FakeEngine


def _deployment(name: str, last_used: float = 0.0, on_demand: bool = True, idle_ttl_s: float = 60.0) -> Deployment:
    target = Target(f"{name}@1", Path("/models") / name, {}, 100)
    slot = Slot(target, FakeEngine(name, FakeBehaviour()), state=SlotState.READY, last_used=last_used)
    return Deployment(name, slot, max_waiting=4, max_wait_seconds=1.0, on_demand=OnDemand(target, idle_ttl_s) if on_demand else None)


def test_the_least_recently_used_idle_one_goes_first():
    recent, old, loading = _deployment("recent", last_used=200.0), _deployment("old", last_used=100.0), _deployment("loading")
    assert least_recently_used_idle([recent, old, loading], loading) is old


def test_none_goes_that_is_busy_always_on_changing_with_a_canary_or_the_one_loading():
    busy, always_on, changing, loading = _deployment("busy"), _deployment("always", on_demand=False), _deployment("changing"), _deployment("loading")
    with_canary = _deployment("canaried")
    with_canary.canary = Canary(_deployment("canary").active, 10)  # unloading its active version would strand it
    busy.active.take_lease()
    asyncio.run(changing.swap_lock.acquire())
    assert least_recently_used_idle([busy, always_on, changing, with_canary, loading], loading) is None


def test_idle_past_its_ttl_only_with_nothing_in_flight_waiting_or_changing():
    idle = _deployment("idle", idle_ttl_s=0.0)
    assert is_idle_past_ttl(idle)
    assert not is_idle_past_ttl(_deployment("fresh", last_used=time.monotonic()))
    assert not is_idle_past_ttl(_deployment("always", idle_ttl_s=0.0, on_demand=False))
    busy = _deployment("busy", idle_ttl_s=0.0)
    busy.active.take_lease()
    assert not is_idle_past_ttl(busy)
    canary = _deployment("canary", idle_ttl_s=0.0)
    canary.canary = Canary(canary.active, 10)
    assert not is_idle_past_ttl(canary)
