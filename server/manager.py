"""The deployment manager: the one owner of deployments, slots and swaps.

A swap: resolve the target -> load a new slot -> verify it (smoke prompts) -> flip -> drain
the old slot (until its leases reach zero or the drain deadline) -> park it as standby or
stop it. Any failure before the flip leaves the old slot serving; every swap, success or
failure, lands in the registry's history with its phases.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from models.catalog import Change
from models.registry import Registry
from server.config import ModelSpec, Settings
from server.deployment import Deployment
from server.drain import StopDecision, decide_stop
from server.engines.base import Engine, GenerationRequest, SamplingParams
from server.errors import ConflictError, InvalidRequestError, ModelNotFoundError, NotFoundError, SwapFailedError
from server.slot import Lease, Slot, SlotState, Target
from server.swap_record import SwapRecord

log = logging.getLogger(__name__)

EngineFactory = Callable[[Path, dict], Engine]
STRATEGIES = ("auto", "blue-green", "replace", "standby")
LOAD_OVERHEAD = 1.2  # loaded bytes per stored byte, for the memory budget
MAX_RECORDS = 200


class DeploymentManager:
    def __init__(self, settings: Settings, registry: Registry, engine_factory: EngineFactory):
        self._settings = settings
        self._registry = registry
        self._engine_factory = engine_factory
        self._deployments: dict[str, Deployment] = {}
        self._records: dict[str, SwapRecord] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- requests -------------------------------------------------------------------------

    async def lease(self, name: str) -> Lease:
        return await self.get(name).lease()

    def get(self, name: str) -> Deployment:
        deployment = self._deployments.get(name)
        if deployment is None:
            known = ", ".join(sorted(self._deployments)) or "none"
            raise ModelNotFoundError(f"The model '{name}' does not exist. Known models: {known}.", param="model")
        return deployment

    @property
    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def holders(self, version: str) -> list[str]:
        """What serves `version` right now: 'deployment chat (active)' and the like."""
        return [
            f"deployment {d.name} ({role})"
            for d in self.deployments
            for role, slot in (("active", d.active), ("canary", d.canary), ("standby", d.standby))
            if slot is not None and slot.version == version
        ]

    def record(self, swap_id: str) -> SwapRecord:
        if swap_id not in self._records:
            raise NotFoundError(f"No swap {swap_id}.", param="swap_id")
        return self._records[swap_id]

    # -- deploy ---------------------------------------------------------------------------

    async def deploy_spec(self, spec: ModelSpec) -> Deployment:
        """Start-up: serve a configured model (a registry version or a local folder)."""
        options = {"dtype": spec.dtype, "max_batch_size": spec.max_batch_size, "max_model_len": spec.max_model_len, "allow_pickle": spec.allow_pickle}
        num_bytes = sum(p.stat().st_size for p in spec.path.rglob("*") if p.is_file())
        return await self._deploy(spec.name, Target(spec.version, spec.path, options, num_bytes))

    async def deploy(self, name: str, ref: str, change: Change) -> Deployment:
        if name in self._deployments:
            raise ConflictError(f"Deployment {name} exists; swap it instead.")
        deployment = await self._deploy(name, self._resolve(ref))
        self._remember(SwapRecord(name, "deploy", None, deployment.version, "load", change.actor, change.reason, status="succeeded"))
        return deployment

    async def _deploy(self, name: str, target: Target) -> Deployment:
        slot = await self._load(target)
        slot.state = SlotState.READY
        deployment = Deployment(name, slot, self._settings.max_waiting, self._settings.max_wait_s)
        self._deployments[name] = deployment
        return deployment

    # -- swaps ----------------------------------------------------------------------------

    async def swap(self, name: str, ref: str, strategy: str, change: Change, wait: bool = True) -> SwapRecord:
        deployment = self._lock_free(name)
        if strategy not in STRATEGIES:
            raise InvalidRequestError(f"Unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.", param="strategy")
        record = SwapRecord(name, "swap", deployment.version, ref, strategy, change.actor, change.reason)
        return await self._run(deployment, record, self._swap(deployment, record, ref, strategy), wait)

    async def rollback(self, name: str, change: Change, wait: bool = True) -> SwapRecord:
        deployment = self._lock_free(name)
        if deployment.previous_version is None:
            raise ConflictError(f"Deployment {name} has no previous version to roll back to.")
        ref = deployment.previous_version
        record = SwapRecord(name, "rollback", deployment.version, ref, "auto", change.actor, change.reason)
        return await self._run(deployment, record, self._swap(deployment, record, ref, "auto"), wait)

    async def start_canary(self, name: str, ref: str, weight: int, change: Change) -> SwapRecord:
        deployment = self._lock_free(name)
        if not 0 < weight < 100:
            raise InvalidRequestError("A canary weight is a percentage between 1 and 99.", param="weight")
        if deployment.canary is not None:
            raise ConflictError(f"Deployment {name} has a canary already ({deployment.canary.version}); promote or abort it first.")
        record = SwapRecord(name, "canary", deployment.version, ref, f"canary {weight}%", change.actor, change.reason)
        return await self._run(deployment, record, self._canary(deployment, record, ref, weight), wait=True)

    async def promote_canary(self, name: str, change: Change) -> SwapRecord:
        deployment = self._with_canary(name)
        record = SwapRecord(name, "promote", deployment.version, deployment.canary.version, "canary", change.actor, change.reason)
        return await self._run(deployment, record, self._promote(deployment, record), wait=True)

    async def abort_canary(self, name: str, change: Change) -> SwapRecord:
        deployment = self._with_canary(name)
        record = SwapRecord(name, "abort", deployment.canary.version, deployment.version, "canary", change.actor, change.reason)
        return await self._run(deployment, record, self._abort_canary(deployment, record), wait=True)

    async def stop_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for deployment in self.deployments:
            for slot in deployment.slots():
                await self._stop(slot)

    # -- the state machine ------------------------------------------------------------------

    async def _run(self, deployment: Deployment, record: SwapRecord, work, wait: bool) -> SwapRecord:
        """Run `work` under the deployment's swap lock; record the outcome either way."""
        self._remember(record)

        async def guarded() -> SwapRecord:
            async with deployment.swap_lock:
                try:
                    await work
                except asyncio.CancelledError as error:
                    record.finish(error)
                    raise
                except Exception as error:
                    record.finish(error)
                    self._to_history(record)
                    raise _as_swap_error(error, record) from error
            record.finish()
            self._to_history(record)
            return record

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if not wait:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # outcome is in the record
            await asyncio.sleep(0)  # let it take the lock before we answer
            return record
        return await asyncio.shield(task)

    async def _swap(self, deployment: Deployment, record: SwapRecord, ref: str, strategy: str) -> None:
        async with record.phase("resolve"):
            target = self._resolve(ref)
            record.to_version = target.version
            strategy = self._choose_strategy(deployment, target) if strategy == "auto" else strategy
            record.strategy = strategy
        if target.version == deployment.version:
            raise ConflictError(f"{deployment.name} already serves {target.version}.")
        if strategy == "standby":
            await self._swap_to_standby(deployment, record, target)
        elif strategy == "replace":
            await self._swap_replace(deployment, record, target)
        else:
            await self._swap_blue_green(deployment, record, target)

    async def _swap_blue_green(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        new = await self._load_and_verify(record, target)
        async with record.phase("flip"):
            old = deployment.flip_to(new)
        await self._retire(deployment, record, old)

    async def _swap_to_standby(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        standby = deployment.standby
        if standby is None or standby.version != target.version:
            raise ConflictError(f"{target.version} is not on standby for {deployment.name}; use blue-green or replace.")
        async with record.phase("flip"):
            deployment.standby = None
            old = deployment.flip_to(standby)
        await self._retire(deployment, record, old)

    async def _swap_replace(self, deployment: Deployment, record: SwapRecord, target: Target) -> None:
        """Both do not fit: drain and unload first; new requests wait in the bounded queue."""
        await self._drop_standby(deployment)
        old = deployment.hold_requests()
        await self._drain(record, old)
        async with record.phase("unload"):
            await self._stop(old)
        try:
            new = await self._load_and_verify(record, target)
        except BaseException:
            async with record.phase("restore"):
                restored = await self._load(old.target)
                deployment.restore(restored)
            raise
        async with record.phase("flip"):
            deployment.flip_to(new)
            deployment.previous_version = old.version

    async def _canary(self, deployment: Deployment, record: SwapRecord, ref: str, weight: int) -> None:
        target = self._resolve(ref)
        record.to_version = target.version
        slot = await self._load_and_verify(record, target)
        async with record.phase("route"):
            deployment.set_canary(slot, weight)

    async def _promote(self, deployment: Deployment, record: SwapRecord) -> None:
        async with record.phase("flip"):
            canary = deployment.set_canary(None, 0)
            old = deployment.flip_to(canary)
        await self._retire(deployment, record, old)

    async def _abort_canary(self, deployment: Deployment, record: SwapRecord) -> None:
        async with record.phase("unroute"):
            canary = deployment.set_canary(None, 0)
        await self._drain(record, canary)
        async with record.phase("stop"):
            await self._stop(canary)

    async def _retire(self, deployment: Deployment, record: SwapRecord, old: Slot) -> None:
        """Drain the slot that stopped taking requests, then keep it on standby or stop it."""
        await self._drain(record, old)
        async with record.phase("park") as phase:
            if old.state is SlotState.STOPPED:
                phase.detail = "stopped at the drain deadline"
                return
            await self._drop_standby(deployment)  # one standby per deployment: the newest
            if self._settings.keep_standby and self._fits(0):
                old.state, deployment.standby = SlotState.STANDBY, old
                phase.detail = "kept loaded on standby"
            else:
                await self._stop(old)
                phase.detail = "stopped; memory freed"

    async def _drain(self, record: SwapRecord, slot: Slot) -> None:
        async with record.phase("drain") as phase:
            slot.state = SlotState.DRAINING
            started = time.monotonic()
            while (decision := decide_stop(slot.num_leases, time.monotonic() - started, self._settings.drain_timeout_s)) is StopDecision.WAIT:
                await slot.wait_drained(self._settings.drain_timeout_s - (time.monotonic() - started))
            if decision is StopDecision.CUT_OFF:
                slot.is_cut_off, slot.num_cut_off = True, slot.num_leases
                record.num_cut_off += slot.num_leases
                phase.detail = f"deadline passed: {slot.num_leases} request(s) ended with model_swapped"
                await self._stop(slot)

    async def _load_and_verify(self, record: SwapRecord, target: Target) -> Slot:
        async with record.phase("load"):
            slot = await self._load(target)
        try:
            async with record.phase("verify"):
                await self._verify(slot)
        except BaseException:
            await self._stop(slot)
            raise
        return slot

    async def _load(self, target: Target) -> Slot:
        slot = Slot(target, self._engine_factory(target.path, target.options))
        try:
            await slot.engine.start()
        except BaseException:
            slot.state = SlotState.FAILED
            await slot.engine.stop()
            raise
        return slot

    async def _verify(self, slot: Slot) -> None:
        """Every smoke prompt must produce at least one token, greedily, within the timeout."""
        async with asyncio.timeout(self._settings.verify_timeout_s):
            for prompt in self._settings.smoke_prompts:
                request = GenerationRequest("smoke-" + uuid.uuid4().hex, slot.engine.tokenize(prompt), SamplingParams(max_tokens=4, temperature=0))
                num_tokens = 0
                async for chunk in slot.engine.generate(request):
                    num_tokens += chunk.num_tokens
                if num_tokens < 1:
                    raise SwapFailedError(f"Smoke prompt {prompt!r} produced no tokens on {slot.version}.")

    async def _stop(self, slot: Slot) -> None:
        if slot.state is not SlotState.STOPPED:
            slot.state = SlotState.STOPPED
            await slot.engine.stop()

    async def _drop_standby(self, deployment: Deployment) -> None:
        if deployment.standby is not None:
            standby, deployment.standby = deployment.standby, None
            await self._stop(standby)

    # -- helpers ----------------------------------------------------------------------------

    def _resolve(self, ref: str) -> Target:
        version = self._registry.resolve_for_serving(ref)
        options = {**version.manifest.engine_options, "allow_pickle": version.manifest.allows_pickle}
        return Target(version.ref, version.path, options, version.manifest.total_bytes)

    def _choose_strategy(self, deployment: Deployment, target: Target) -> str:
        if deployment.standby is not None and deployment.standby.version == target.version:
            return "standby"
        return "blue-green" if self._fits(target.num_bytes) else "replace"

    def _fits(self, extra_bytes: int) -> bool:
        loaded = sum(s.num_bytes for d in self.deployments for s in d.slots() if s.state is not SlotState.STOPPED)
        return (loaded + extra_bytes) * LOAD_OVERHEAD <= self._settings.memory_budget_bytes

    def _lock_free(self, name: str) -> Deployment:
        deployment = self.get(name)
        if deployment.swap_lock.locked():
            raise ConflictError(f"Deployment {name} is already swapping; wait for it to finish.", code="swap_in_progress")
        return deployment

    def _with_canary(self, name: str) -> Deployment:
        deployment = self._lock_free(name)
        if deployment.canary is None:
            raise ConflictError(f"Deployment {name} has no canary.")
        return deployment

    def _remember(self, record: SwapRecord) -> None:
        self._records[record.id] = record
        while len(self._records) > MAX_RECORDS:
            self._records.pop(next(iter(self._records)))

    def _to_history(self, record: SwapRecord) -> None:
        model, _, number = (record.to_version or record.deployment).partition("@")
        try:
            self._registry.record(Change(record.actor, record.reason), record.action, model, int(number) if number.isdigit() else None, record.to_dict())
        except Exception:  # history must never turn a finished swap into a failed request
            log.exception("could not record %s in the history", record.id)


def _as_swap_error(error: Exception, record: SwapRecord) -> BaseException:
    if isinstance(error, (ConflictError, NotFoundError)):
        return error  # an unknown or corrupt version, a conflict: say so as it is
    return SwapFailedError(f"Swap {record.id} of {record.deployment} to {record.to_version} failed; {record.from_version} keeps serving. Reason: {error}")
