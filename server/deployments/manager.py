"""The deployment manager: the one owner of deployments and the entry to every change of
what they serve. Requests are routed and leased by its router.py; deploys, swaps, rollbacks,
canaries and on-demand loads are resolved (targets.py) and planned here (refused before
anything stops), then run
under the deployment's swap lock: swaps.py carries each strategy out, slot_lifecycle.py
each slot's steps, swap_history.py keeps what happened. The decisions are pure functions in
strategy.py, layout.py, memory_plan.py and drain.py. Background: on_demand.py loads and
unloads on-demand deployments; engine_watch.py and health_watch.py watch the serving ones.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from models.catalog import Change
from models.names import check_name
from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from server.deployments.deployment import Deployment, OnDemand
from server.deployments.engine_watch import EngineWatch
from server.deployments.health import CanaryAnalysis, HealthPolicy, check_canary_share
from server.deployments.health_watch import HealthWatch
from server.deployments.layout import ModelLayout, reload_blocker
from server.deployments.on_demand import OnDemandLoads
from server.deployments.resume import start_point
from server.deployments.router import Router, names_of
from server.deployments.targets import Targets, spec_overrides
from server.deployments.slot import Slot, SlotState, Target
from server.deployments.slot_lifecycle import EngineFactory, SlotLifecycle
from server.deployments.strategy import STRATEGIES, Choice, SwapFacts, choose_strategy, no_room_beside, preview
from server.deployments.swap_history import SwapHistory
from server.deployments.swap_record import SwapRecord, as_swap_error
from server.deployments.swaps import Swaps
from server.observability.metrics import Metrics
from server.engines.base import can_reload, engine_process_ids
from server.engines.options import engine_only
from models.errors import BatonError, ConflictError, InvalidRequestError, ModelNotFoundError, NotFoundError, SwapFailedError

log = logging.getLogger(__name__)

class DeploymentManager:
    def __init__(self, settings: Settings, registry: Registry, engine_factory: EngineFactory, metrics: Metrics | None = None):
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._registry = registry
        self._targets = Targets(settings, registry)
        self._slots = SlotLifecycle(settings, engine_factory, self._metrics, lambda: self.deployments)
        self._swaps = Swaps(self._slots)
        self._history = SwapHistory(registry, self._metrics)
        self._deployments: dict[str, Deployment] = {}
        self._tasks: set[asyncio.Task] = set()
        self._on_demand = OnDemandLoads(lambda: self.deployments, self._slots, self._history, self.keep)
        self.router = Router(lambda: self._deployments, registry, self._on_demand.start_load)

    def start(self) -> None:
        """Background work: unloading on-demand deployments that sat idle past their TTL,
        bringing back deployments whose engine died, watching deployments' health."""
        self.keep(asyncio.ensure_future(self._on_demand.unload_idle_forever(self._settings.idle_check_s)))
        self.keep(asyncio.ensure_future(EngineWatch(lambda: self.deployments, self._slots, self._history, self._metrics, self._settings, self.abort_canary).run_forever()))
        self.keep(asyncio.ensure_future(HealthWatch(self, self._metrics, self._settings).run_forever()))

    # -- requests -------------------------------------------------------------------------

    def get(self, name: str) -> Deployment:
        """The deployment an admin change names."""
        if (deployment := self._deployments.get(name)) is None:
            raise NotFoundError(f"No deployment '{name}'. Deployments: {names_of(self._deployments)}.", param="name", code="deployment_not_found")
        return deployment

    @property
    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def engine_owners(self) -> dict[int, tuple[str, str]]:
        """pid -> (deployment, version) for every process a loaded engine runs in."""
        return {pid: (d.name, s.version) for d in self.deployments for s in d.slots() if s.state is not SlotState.STOPPED for pid in engine_process_ids(s.engine)}

    def num_in_flight(self) -> int:
        """Requests holding a lease or waiting for one, over every deployment."""
        return sum(d.num_waiting + d.admission.num_waiting + sum(s.num_leases for s in d.slots()) for d in self.deployments)

    def holders(self, version: str) -> list[str]:
        """What serves `version` right now: 'deployment chat (active)' and the like."""
        return [
            f"deployment {d.name} ({role})"
            for d in self.deployments
            for role, slot in d.roles()
            if slot.version == version
        ]

    def record(self, swap_id: str) -> SwapRecord:
        return self._history.get(swap_id)

    # -- deploy ---------------------------------------------------------------------------

    async def deploy_spec(self, spec: ModelSpec, saved: dict | None = None) -> Deployment:
        """Start-up: serve a configured model, a registry version (resolved as a swap would
        resolve it, with the spec's explicit engine settings on top) or a local folder. With
        `saved` (what this deployment served before a restart), a registry version starts
        where `start_point` says: loaded once, not loaded and then swapped."""
        if self._targets.is_registry_version(spec):
            target, overrides = self._resolve_for_start(spec, spec_overrides(spec), saved)
        else:
            target, overrides = self._targets.of_folder(spec), spec_overrides(spec)
        on_demand = OnDemand(target, spec.idle_ttl_s) if spec.on_demand else None
        deployment = await self._deploy(spec.name, target, on_demand, spec.smoke_prompts, overrides, spec.health)
        deployment.started_as = spec.version
        return deployment

    async def deploy(
        self,
        name: str,
        ref: str,
        change: Change,
        on_demand: bool = False,
        idle_ttl_s: float = 300.0,
        smoke_prompts: list[str] | None = None,
        health: HealthPolicy | None = None,
        engine_options: dict | None = None,
    ) -> Deployment:
        check_name(name, "deployment name")  # clients send it as `model`; it is in URLs and logs
        if name in self._deployments:
            raise ConflictError(f"Deployment {name} exists; swap it instead.")
        target = self._targets.of_version(ref, engine_options)
        deployment = await self._deploy(name, target, OnDemand(target, idle_ttl_s) if on_demand else None, smoke_prompts, engine_options, health)
        self._history.add_finished(SwapRecord(name, "deploy", None, target.version, "on-demand" if on_demand else "load", change.actor, change.reason))
        self._save(deployment)
        return deployment

    def configure(self, name: str, smoke_prompts: list[str] | None, health: HealthPolicy, idle_ttl_s: float) -> None:
        """Settings that change in place: smoke prompts (the next swap's), the health policy
        (the next check's), and an on-demand deployment's idle TTL."""
        deployment = self.get(name)
        deployment.smoke_prompts, deployment.policy = smoke_prompts, health.check_for(name)
        if deployment.on_demand is not None:
            deployment.on_demand = replace(deployment.on_demand, idle_ttl_s=idle_ttl_s)
        self._save(deployment)

    async def restore(self, saved: dict[str, dict]) -> None:
        """Start-up, after `deploy_spec`: bring back the deployments the start-up settings do
        not name (those they name started where `start_point` said), recorded in the history."""
        change = Change("baton", "restored after a restart")
        for name, state in saved.items():
            if name not in self._deployments:
                try:
                    await self.deploy(name, state["version"], change, state["on_demand"], state["idle_ttl_s"], state["smoke_prompts"], HealthPolicy.model_validate(state["health"]), state["engine_overrides"])
                except BatonError as error:
                    self._not_restored(name, state.get("version"), error)
                    continue
            await self._restore_canary(self._deployments[name], state, change)

    async def _restore_canary(self, deployment: Deployment, saved: dict, change: Change) -> None:
        """A saved canary comes back beside the version it was the canary of, and an aborted
        one stays aborted; not where the start-up settings chose another version (the
        operator's new choice), nor on demand. Its analysis starts afresh."""
        if deployment.active is None or deployment.version != saved["version"]:
            return
        deployment.aborted_canary = saved.get("aborted_canary")
        if (canary := saved.get("canary")) is None:
            return
        analysis = CanaryAnalysis.model_validate(canary["analysis"]) if canary["analysis"] else None
        try:
            await self.start_canary(deployment.name, canary["version"], canary["weight"], change, analysis, canary.get("mirror", 0))
        except BatonError as error:  # the deployment serves on without it
            log.error("could not restore the canary %s of %s: %s", canary["version"], deployment.name, error)

    def _not_restored(self, name: str, version: str | None, error: BatonError) -> None:
        """Logged; forgotten too where no restart could bring it back."""
        log.error("could not restore deployment %s (%s): %s", name, version, error)
        if _can_never_come_back(error):
            self._registry.forget_deployment(name)
            log.warning("forgot saved deployment %s: no restart could bring it back", name)

    def _save(self, deployment: Deployment) -> None:
        """What this deployment serves, for `restore` after a restart (a removed one is gone)."""
        version = deployment.target_version
        if not self._is_current(deployment) or version is None or "@" not in version:  # a local folder is no registry version to come back to
            return
        state = {
            "version": version,
            "on_demand": deployment.on_demand is not None,
            "idle_ttl_s": deployment.on_demand.idle_ttl_s if deployment.on_demand else 300.0,
            "smoke_prompts": deployment.smoke_prompts,
            "health": deployment.policy.model_dump(mode="json"),
            "engine_overrides": deployment.engine_overrides,
            "started_as": deployment.started_as,
            "canary": deployment.canary.saved() if deployment.canary else None,
            "aborted_canary": deployment.aborted_canary,
        }
        try:
            self._registry.save_deployment(deployment.name, state)
        except Exception:  # saving must never turn a finished swap into a failed one
            log.exception("could not save deployment %s", deployment.name)

    async def _deploy(
        self,
        name: str,
        target: Target,
        on_demand: OnDemand | None,
        smoke_prompts: list[str] | None,
        overrides: dict | None = None,
        health: HealthPolicy | None = None,
    ) -> Deployment:
        """An on-demand deployment starts unloaded; its first request loads it."""
        policy = (health or HealthPolicy()).check_for(name)  # before anything loads
        slot = None
        if on_demand is None:
            slot = await self._slots.load(target)
            slot.move_to(SlotState.READY, f"serving {name}")
        settings = self._settings
        deployment = Deployment(name, slot, settings.max_waiting, settings.max_wait_s, on_demand, overrides, settings.max_running_per_deployment)
        deployment.smoke_prompts = smoke_prompts
        deployment.policy = policy
        self._deployments[name] = deployment
        return deployment

    # -- swaps ----------------------------------------------------------------------------

    async def swap(self, name: str, ref: str, strategy: str, change: Change, wait: bool = True, engine_options: dict | None = None) -> SwapRecord:
        """Refused before anything stops (unknown, corrupt or mid-import version; a strategy
        that cannot apply); else runs, and answers when it ends unless `wait` is false.
        `engine_options` replace the deployment's overrides: with them, a swap to the version
        it serves restarts that version's engine with the new options."""
        deployment = self._lock_free(name)
        if strategy not in STRATEGIES:
            raise InvalidRequestError(f"Unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.", param="strategy")
        overrides = deployment.engine_overrides if engine_options is None else engine_options
        target, _, choice = self._plan_swap(deployment, ref, strategy, overrides)
        record = SwapRecord(name, "swap", deployment.target_version, target.version, choice.strategy, change.actor, change.reason, strategy_reason=choice.reason)
        return await self._run(deployment, record, self._swap(deployment, record, target, choice, overrides), wait)

    def preview_swap(self, name: str, ref: str, strategy: str, engine_options: dict | None = None) -> dict:
        """What `swap` would do, refused as it would be, and nothing done (a dry run)."""
        deployment = self._lock_free(name)
        overrides = deployment.engine_overrides if engine_options is None else engine_options
        target, facts, choice = self._plan_swap(deployment, ref, strategy, overrides)
        return {"deployment": name, "from_version": deployment.target_version, "to_version": target.version} | preview(choice, facts)

    def preview_rollback(self, name: str) -> dict:
        """What `rollback` would do (a dry run): a swap back by auto."""
        return self.preview_swap(name, _previous_version(self.get(name)), "auto")

    async def rollback(self, name: str, change: Change, wait: bool = True) -> SwapRecord:
        deployment = self._lock_free(name)
        target, _, choice = self._plan_swap(deployment, _previous_version(deployment), "auto", deployment.engine_overrides)
        record = SwapRecord(name, "rollback", deployment.target_version, target.version, choice.strategy, change.actor, change.reason, strategy_reason=choice.reason)
        return await self._run(deployment, record, self._swap(deployment, record, target, choice, deployment.engine_overrides), wait)

    async def start_canary(self, name: str, ref: str, weight: int, change: Change, analysis: CanaryAnalysis | None = None, mirror: int = 0) -> SwapRecord:
        deployment = self._lock_free(name)
        check_canary_share(weight, mirror)
        if analysis is not None:
            analysis.check_steps_above(weight)
        if deployment.canary is not None:
            raise ConflictError(f"Deployment {name} has a canary already ({deployment.canary.version}); promote or abort it first.")
        if deployment.active is None:  # a canary takes a share of what a loaded version serves
            raise ConflictError(f"Deployment {name} has no version loaded{' (on demand)' if deployment.on_demand else ''}; a canary runs beside a loaded one.")
        target = self._targets.of_version(ref, deployment.engine_overrides)  # an unknown or corrupt version: refused now
        if target.version == deployment.version:
            raise ConflictError(f"{name} serves {target.version} already; a canary is another version.")
        if refusal := no_room_beside(self._slots.needed_bytes(target), **self._slots.room_beside(target)):
            raise ConflictError(f"Cannot start a canary of {target.version}: {refusal}.", code="insufficient_memory")
        record = SwapRecord(name, "canary", deployment.version, target.version, f"canary {weight}%" + (f", {mirror}% mirrored" if mirror else ""), change.actor, change.reason)
        return await self._run(deployment, record, self._swaps.canary(deployment, record, target, weight, analysis, mirror), wait=True)

    async def step_canary(self, name: str, change: Change, weight: int) -> SwapRecord:
        """The canary's share of requests, moved to `weight`."""
        deployment = self._with_canary(name)
        record = SwapRecord(name, "step", deployment.version, deployment.canary.version, f"canary {deployment.canary.weight}% -> {weight}%", change.actor, change.reason)
        return await self._run(deployment, record, self._swaps.step_canary(deployment, record, weight), wait=True)

    async def promote_canary(self, name: str, change: Change) -> SwapRecord:
        deployment = self._with_canary(name)
        record = SwapRecord(name, "promote", deployment.version, deployment.canary.version, "canary", change.actor, change.reason)
        return await self._run(deployment, record, self._swaps.promote(deployment, record), wait=True)

    async def abort_canary(self, name: str, change: Change) -> SwapRecord:
        deployment = self._with_canary(name)
        record = SwapRecord(name, "abort", deployment.canary.version, deployment.version, "canary", change.actor, change.reason)
        return await self._run(deployment, record, self._swaps.abort_canary(deployment, record), wait=True)

    async def remove(self, name: str, change: Change, wait: bool = True) -> SwapRecord:
        """Stop serving `name`: a request for it gets a 404 from now on, those in flight finish
        (until the drain deadline), every slot stops, and a restart does not bring it back."""
        deployment = self._lock_free(name)
        if relying := [d.name for d in self.deployments if name in d.policy.fallbacks]:
            raise ConflictError(f"Deployment {name} is a fallback of {', '.join(relying)}; change their health policy first.", code="deployment_in_use")
        record = SwapRecord(name, "remove", deployment.target_version, None, "remove", change.actor, change.reason)
        return await self._run(deployment, record, self._remove(deployment, record), wait)

    async def _remove(self, deployment: Deployment, record: SwapRecord) -> None:
        name = deployment.name
        async with record.phase("unroute"):
            self._registry.forget_deployment(name)  # first: should the server die mid-drain, it stays removed
            del self._deployments[name]
            slots = deployment.remove(ModelNotFoundError(f"The model '{name}' was removed.", param="model"))
        for slot in slots:
            if slot.state is SlotState.READY:
                await self._slots.drain(record, slot)
        async with record.phase("stop") as phase:
            for slot in slots:
                await self._slots.stop(slot)
            phase.detail = f"{len(slots)} engine(s) stopped" if slots else "nothing was loaded"

    async def unload(self, name: str, change: Change, wait: bool = True) -> SwapRecord:
        """An on-demand deployment's engine stops now rather than at its idle TTL (its memory
        for other work): requests in flight finish (until the drain deadline), and the next
        request loads it again."""
        deployment = self._lock_free(name)
        if deployment.on_demand is None:
            raise ConflictError(f"Deployment {name} is always on; make it on demand first, or undeploy it.", code="not_on_demand")
        if deployment.active is None:
            raise ConflictError(f"Deployment {name} has nothing loaded.", code="not_loaded")
        if deployment.canary is not None:
            raise ConflictError(f"Deployment {name} has a canary ({deployment.canary.version}); promote or abort it first.")
        record = SwapRecord(name, "unload", deployment.version, None, "on-demand", change.actor, change.reason)
        return await self._run(deployment, record, self._on_demand.drain_and_unload(deployment, record), wait)

    async def stop_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._slots.stop_for_good([slot for deployment in self.deployments for slot in deployment.slots()])

    async def set_on_demand(self, name: str, on_demand: bool, idle_ttl_s: float) -> None:
        """Switched in place. An always-on deployment becomes on-demand (the idle check unloads
        it later); an unloaded on-demand one that becomes always-on is loaded now."""
        deployment = self._lock_free(name)
        if on_demand and deployment.on_demand is None:
            if deployment.active is None:
                raise ConflictError(f"Deployment {name} has no version loaded; swap it first.")
            deployment.on_demand = OnDemand(deployment.active.target, idle_ttl_s)
        elif not on_demand and deployment.on_demand is not None:
            if deployment.active is None:
                await self._on_demand.start_load(deployment)
                if deployment.active is None:
                    raise SwapFailedError(f"Deployment {name} could not be loaded; it stays on demand.")
            deployment.on_demand = None
        self._save(deployment)

    # -- running a change under the swap lock ------------------------------------------------

    async def _run(self, deployment: Deployment, record: SwapRecord, work, wait: bool) -> SwapRecord:
        """Run `work` under the deployment's swap lock; record the outcome either way."""
        self._history.add(record)

        async def guarded() -> SwapRecord:
            async with deployment.swap_lock:
                try:
                    await self._unless_removed(deployment, work)
                except asyncio.CancelledError as error:
                    record.finish(error)
                    raise
                except Exception as error:
                    record.finish(error)
                    self._history.close(record)
                    raise as_swap_error(error, record) from error
            record.finish()
            self._history.close(record)
            self._save(deployment)
            return record

        task = self.keep(asyncio.ensure_future(guarded()))
        if not wait:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # outcome is in the record
            await asyncio.sleep(0)  # let it take the lock before we answer
            return record
        return await asyncio.shield(task)

    async def _unless_removed(self, deployment: Deployment, work) -> None:
        """A change that waited for the swap lock while the deployment was removed runs not
        at all (else it would load an engine that no deployment owns)."""
        if not self._is_current(deployment):
            work.close()
            raise ModelNotFoundError(f"The model '{deployment.name}' was removed.", param="name")
        await work

    def _plan_swap(self, deployment: Deployment, ref: str, strategy: str, overrides: dict) -> tuple[Target, SwapFacts, Choice]:
        target = self._targets.for_swap(deployment, ref, overrides)
        if not deployment.is_failed and target.version == deployment.target_version and overrides == deployment.engine_overrides:
            raise ConflictError(f"{deployment.name} already serves {target.version}{'' if deployment.active else ' (on demand)'}.")
        if deployment.canary is not None and target.version == deployment.canary.version:  # else two engines of one version
            raise ConflictError(f"{target.version} is {deployment.name}'s canary; promote it (or abort it and swap).")
        facts = self._swap_facts(deployment, target)
        return target, facts, choose_strategy(strategy, facts)

    def _swap_facts(self, deployment: Deployment, target: Target) -> SwapFacts:
        standby, active = deployment.standby, deployment.active
        is_unloaded = active is None and deployment.on_demand is not None and not deployment.is_failed
        return SwapFacts(
            is_down=active is None and not is_unloaded,
            is_unloaded=is_unloaded,
            is_on_standby=standby is not None and (standby.version, standby.target.options) == (target.version, target.options),
            reload_blocker=_reload_blocker(active, target) if active is not None else "nothing is loaded",
            changes_output_only=active is not None and _changes_output_only(active.target, target),
            wakes_in_turn=standby is not None and self._slots.wakes_in_turn(standby),
            needed_bytes=self._slots.needed_bytes(target),
            joins_running_engine=self._slots.joins_running_engine(target),
            **self._slots.room_beside(target),
        )

    async def _swap(self, deployment: Deployment, record: SwapRecord, target: Target, choice: Choice, overrides: dict) -> None:
        await self._swaps.run(choice.strategy, deployment, record, target)
        deployment.engine_overrides = overrides

    # -- helpers ----------------------------------------------------------------------------

    @property
    def memory_in_use_bytes(self) -> int:
        return self._slots.memory_in_use_bytes

    def _resolve_for_start(self, spec: ModelSpec, overrides: dict, saved: dict | None) -> tuple[Target, dict]:
        """The target and engine overrides a named registry version starts with."""
        version, options = start_point(spec.version, overrides, saved, spec.rolls_out)
        if (version, options) != (spec.version, overrides):
            try:
                target = self._targets.of_version(version, options)
            except BatonError as error:  # deleted since, say: the flags' version it is
                self._not_restored(spec.name, version, error)
            else:
                self._history.add_finished(SwapRecord(spec.name, "deploy", None, target.version, "load", "baton", "restored after a restart"))
                return target, options
        return self._targets.of_version(spec.version, overrides), overrides

    def _is_current(self, deployment: Deployment) -> bool:
        """Still served under its name: not removed (nor replaced by a new one of that name)."""
        return self._deployments.get(deployment.name) is deployment

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

    def keep(self, task: asyncio.Task) -> asyncio.Task:
        """Hold background tasks until they end, so none is collected mid-way; stop_all cancels them."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _previous_version(deployment: Deployment) -> str:
    if deployment.previous_version is None:
        raise ConflictError(f"Deployment {deployment.name} has no previous version to roll back to.")
    return deployment.previous_version


def _can_never_come_back(error: BatonError) -> bool:
    """A saved deployment whose version was deleted since, or whose name (or version's name)
    is no longer valid, fails alike at every start; an engine that failed to start may not."""
    return isinstance(error, NotFoundError) or (isinstance(error, InvalidRequestError) and error.param == "name")


def _changes_output_only(active: Target, target: Target) -> bool:
    return active.version == target.version and active.options != target.options and engine_only(active.options) == engine_only(target.options)


def _reload_blocker(active: Slot, target: Target) -> str | None:
    if active.target.shared_engine_key is not None:  # its engine is an EngineShare
        blocker = active.engine.reload_blocker(target.shared_engine_key, target.adapter)
    elif target.shared_engine_key is not None:
        blocker = "the running engine has LoRA off, and the version needs it on"
    else:
        blocker = None if can_reload(active.engine) else f"the {active.engine.name} engine cannot reload weights in place"
    return blocker or reload_blocker(ModelLayout.read(active.target.path), ModelLayout.read(target.path), active.target.options, target.options)
