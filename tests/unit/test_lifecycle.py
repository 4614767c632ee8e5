"""Lifecycle.unless_shutting_down: start-up's loads run to their end, or are cancelled by a
shutdown that begins meanwhile; a start-up that fails fails as it did."""

from __future__ import annotations

import asyncio

import pytest

from server.lifecycle import Lifecycle


async def _load(seconds: float, outcome: list[str]) -> None:
    try:
        await asyncio.sleep(seconds)
        outcome.append("loaded")
    except asyncio.CancelledError:
        outcome.append("cancelled")
        raise


def test_a_start_up_with_no_shutdown_runs_to_its_end():
    outcome: list[str] = []
    assert asyncio.run(Lifecycle().unless_shutting_down(_load(0.01, outcome))) is True
    assert outcome == ["loaded"]


def test_a_shutdown_during_start_up_cancels_its_loads():
    outcome: list[str] = []

    async def signal_during_start_up() -> bool:
        lifecycle = Lifecycle()
        asyncio.get_running_loop().call_later(0.05, lifecycle.begin_shutdown)
        return await lifecycle.unless_shutting_down(_load(60, outcome))

    assert asyncio.run(asyncio.wait_for(signal_during_start_up(), 5)) is False
    assert outcome == ["cancelled"]


def test_a_failed_start_up_fails_as_it_did():
    async def broken() -> None:
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        asyncio.run(Lifecycle().unless_shutting_down(broken()))
