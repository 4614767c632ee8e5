"""How each strategy carries a swap out, once strategy.py has chosen it and the manager holds
the deployment's swap lock. standby: wake and flip | reload: hold, drain, new weights in the
running engine, verify, resume | blue-green: load beside, verify, flip | replace: hold,
drain, sleep or unload the old, load, verify, flip; then the old slot drains and is parked
on standby or stopped. Rule: any failure before the flip leaves the old version serving.
The steps a slot goes through are slot_lifecycle.py's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from models.errors import ConflictError
from server.deployments.deployment import Deployment
from server.deployments.health import CanaryAnalysis
from server.deployments.slot import Slot, SlotState, Target
from server.deployments.slot_lifecycle import SlotLifecycle
from server.deployments.swap_record import SwapRecord

log = logging.getLogger(__name__)

SECONDS_FOR_CUT_OFF_REQUESTS = 10.0  # after a reload aborts them, for their leases to come back


class Swaps:
    def __init__(self, slots: SlotLifecycle):
        self._slots = slots

    async def run(self, strategy: str, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        """Carry out one of strategy.py's choices (never `auto`: it has been resolved)."""
        steps = {
            "standby": self._to_standby,
            "reload": self._reload,
            "replace": self._replace,
            "blue-green": self._blue_green,
            "load": self._into_down,
            "in-place": self._in_place,
            "on-demand": self._retarget,
        }
        await steps[strategy](deployment, record, target)

    async def _in_place(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        async with record.phase("retarget") as phase:
            deployment.active.read_output_with(target.options)
            phase.detail = "new output options on the running engine"

    async def _retarget(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        async with record.phase("retarget") as phase:
            deployment.retarget(target)
            phase.detail = "the next request loads it"

    async def _into_down(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        """A deployment left down by a dead engine: load the target; requests resume on it."""
        new = await self._slots.load_and_verify(record, target, deployment)
        async with record.phase("flip"):
            deployment.flip_to(new)

    async def _blue_green(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        new = await self._slots.load_and_verify(record, target, deployment)
        async with record.phase("flip"):
            old = deployment.flip_to(new)
        await self._retire(deployment, record, old)

    async def _to_standby(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        standby = deployment.standby
        if standby is None or standby.version != target.version:
            raise ConflictError(f"{target.version} is not on standby for {deployment.name}; use blue-green or replace.")
        if self._slots.wakes_in_turn(standby):
            await self._to_standby_in_turn(deployment, record, standby)
            return
        if standby.state is SlotState.ASLEEP:
            try:
                await self._slots.wake(record, standby)
            except BaseException:
                await self._slots.drop_standby(deployment)  # half awake is no standby
                raise
        async with record.phase("flip"):
            deployment.standby = None
            old = deployment.flip_to(standby)
        await self._retire(deployment, record, old)

    async def _to_standby_in_turn(self, deployment: Deployment, record: SwapRecord, standby: Slot) -> None:
        """Both awake do not fit (vLLM on GPU reserves most of the device): new requests wait
        in the bounded queue while the active version drains and falls asleep, then the
        standby wakes. If it cannot, the old version comes back."""
        deployment.standby = None
        old = deployment.hold_requests()
        await self._retire(deployment, record, old)
        await self._take_over(deployment, record, old, self._slots.wake_or_stop(record, standby))

    async def _take_over(self, deployment: Deployment, record: SwapRecord, old: Slot, bring_up) -> None:
        """The end of an in-turn swap, with requests held and `old` unloaded or asleep: the
        slot `bring_up` yields takes the traffic; if it fails, `old` serves again."""
        try:
            new = await bring_up
        except BaseException:
            async with record.phase("restore"):
                deployment.restore(await self._bring_back(deployment, old))
            raise
        async with record.phase("flip"):
            deployment.flip_to(new)
            deployment.previous_version = old.version

    async def _bring_back(self, deployment: Deployment, old: Slot) -> Slot:
        """The version a failed swap unloaded or put to sleep, serving again."""
        if deployment.standby is old:
            deployment.standby = None
            await old.engine.wake_up()
            return old
        return await self._slots.load(old.target)

    async def _reload(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        """Same layout: new requests wait while the active slot drains, its engine loads the
        new weights in place and answers the smoke prompts; then they resume on it. Nothing
        else is loaded. If any step fails, the old weights go back and the old version serves."""
        async with record.phase("prefetch") as phase:
            num_bytes = await asyncio.to_thread(_read_into_page_cache, target.path)
            phase.detail = f"{num_bytes >> 20} MiB read ahead, before requests are held"
        slot = deployment.hold_requests()
        old_target, is_reloading = slot.target, False
        try:
            await self._slots.drain(record, slot)
            async with record.phase("reload") as phase:
                is_reloading = True
                await self._slots.reload(slot, target)  # ends requests cut off at the deadline
                await slot.wait_drained(SECONDS_FOR_CUT_OFF_REQUESTS)
                slot.retarget(replace(target, memory_bytes=slot.memory_bytes))
                phase.detail = "weights swapped in the running engine"
            await self._slots.verify_phase(record, slot, deployment)
        except BaseException:
            async with record.phase("restore"):
                deployment.restore(await self._with_old_weights(slot, old_target) if is_reloading else slot)
            raise
        async with record.phase("flip"):
            deployment.flip_to(slot)
            deployment.previous_version = old_target.version

    async def _with_old_weights(self, slot: Slot, old_target: Target) -> Slot:
        """After a failed reload: the old weights back in the same engine, or, if even that
        fails, the old version in a fresh one."""
        try:
            await self._slots.reload(slot, old_target)
        except Exception:
            log.exception("%s could not reload its old weights; starting it afresh", old_target.version)
            await self._slots.stop(slot)
            return await self._slots.load(old_target)
        slot.retarget(old_target)
        return slot

    async def _replace(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        """Both do not fit: the old version sleeps (where its engine can: a failed load
        wakes it in under a second, and it stays on standby for rollback) or unloads; new
        requests wait in the bounded queue until the new one answers."""
        await self._slots.drop_standby(deployment)
        old = deployment.hold_requests()
        is_cut_off = await self._slots.drain(record, old)
        async with record.phase("unload") as phase:
            phase.detail = await self._slots.stop_cut_off(old) if is_cut_off else await self._slots.park(deployment, old, may_stay_loaded=False)
        await self._take_over(deployment, record, old, self._slots.load_and_verify(record, target, deployment))

    async def canary(self, deployment: Deployment, record: SwapRecord, target: Target, weight: int, analysis: CanaryAnalysis | None, mirror: int) -> None:
        slot = await self._slots.load_and_verify(record, target, deployment)
        async with record.phase("route"):
            deployment.start_canary(slot, weight, analysis, mirror)

    async def step_canary(self, deployment: Deployment, record: SwapRecord, weight: int) -> None:
        async with record.phase("route"):
            deployment.canary.step_to(weight)

    async def promote(self, deployment: Deployment, record: SwapRecord) -> None:
        async with record.phase("flip"):
            old = deployment.flip_to(deployment.end_canary())
        await self._retire(deployment, record, old)

    async def abort_canary(self, deployment: Deployment, record: SwapRecord) -> None:
        async with record.phase("unroute"):
            canary = deployment.abort_canary()
        await self._slots.drain(record, canary)
        async with record.phase("stop"):
            await self._slots.stop(canary)

    async def _retire(self, deployment: Deployment, record: SwapRecord, old: Slot) -> None:
        """Drain the slot that stopped taking requests, then keep it on standby or stop it."""
        is_cut_off = await self._slots.drain(record, old)
        async with record.phase("park") as phase:
            if is_cut_off:
                phase.detail = await self._slots.stop_cut_off(old)
                return
            await self._slots.drop_standby(deployment)  # one standby per deployment: the newest
            phase.detail = await self._slots.park(deployment, old, may_stay_loaded=True)


def _read_into_page_cache(folder: Path) -> int:
    """Read a version's weights once so that the reload, with requests held, copies from
    memory instead of waiting on the disk. Returns the bytes read."""
    num_bytes = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb", buffering=0) as weights:
            while chunk := weights.read(16 << 20):
                num_bytes += len(chunk)
    return num_bytes
