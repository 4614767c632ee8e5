"""From the config file's desired deployments to what runs: a pure plan, then its changes
applied through the swap machinery (draining and verification as for any swap).

Rules: every ref is resolved before anything changes, so a file naming an unknown version
changes nothing; a deployment the file does not name is left as it is (reported
`unmanaged`); a new version, or new engine options (which need a new engine), is swapped
to; smoke prompts, the health policy, `on_demand` and its idle TTL change in place.

A deployment whose file names a `canary` rollout gets a new version as a canary beside the
loaded one (an older canary of another version is aborted first), and a canary of the
file's version is left to roll out: not drift, the file is on its way. A rollout whose
canary was aborted (by its analysis, an operator, or its engine's death) is halted: no
reload starts that version's canary again (drift, said), until an operator starts it or the
file names another version. The file naming a version that runs as a canary, with no
rollout, promotes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from models.catalog import Change
from models.errors import BatonError, ConfigError
from server.config.file import ConfigFile, DeploymentConfig

Action = Literal["deploy", "swap", "canary", "promote", "rolling", "halted", "update", "keep", "unmanaged"]
IN_PLACE = ("smoke_prompts", "health", "on_demand", "idle_ttl_s")


@dataclass(frozen=True)
class State:
    """A deployment as the file asks for it, or as it runs: comparable field by field."""

    version: str | None
    on_demand: bool = False
    idle_ttl_s: float | None = None  # only with on_demand
    smoke_prompts: tuple[str, ...] | None = None
    health: str = "{}"  # the policy as sorted JSON
    engine_options: str = "{}"  # sorted JSON
    canary: str | None = None  # as it runs: the canary's version
    is_loaded: bool = True  # as it runs: a version is loaded (a canary runs beside one only)
    aborted: str | None = None  # as it runs: the version whose canary was aborted last
    rolls_out: bool = False  # as the file asks: a new version goes out as a canary

    @classmethod
    def of(cls, version, on_demand, idle_ttl_s, smoke_prompts, health, engine_options, **rollout) -> State:
        """`rollout`: canary, is_loaded, aborted (as it runs) or rolls_out (as the file asks)."""
        return cls(
            version,
            on_demand,
            idle_ttl_s if on_demand else None,
            tuple(smoke_prompts) if smoke_prompts else None,
            json.dumps(health.model_dump(mode="json"), sort_keys=True),
            json.dumps(engine_options or {}, sort_keys=True),
            **rollout,
        )


@dataclass(frozen=True)
class PlannedChange:
    deployment: str
    action: Action
    current: str | None
    desired: str | None
    settings: tuple[str, ...] = ()  # changed in place
    new_engine_options: bool = False  # the swap restarts the engine with them
    canary: str | None = None  # the canary running now

    def describe(self) -> str:
        options = " with new engine options" if self.new_engine_options else ""
        beside = f" (canary {self.canary} beside it)" if self.canary else ""
        text = {
            "deploy": f"+ {self.deployment}: deploy {self.desired}",
            "swap": f"~ {self.deployment}: swap {self.current} -> {self.desired}{options}",
            "canary": f"~ {self.deployment}: canary {self.desired} beside {self.current}" + (f", aborting canary {self.canary}" if self.canary else ""),
            "promote": f"~ {self.deployment}: promote canary {self.desired} over {self.current}",
            "rolling": f"= {self.deployment}: {self.current}, canary {self.desired} rolling out",
            "halted": f"! {self.deployment}: {self.current}; the canary of {self.desired} was aborted (start it again by hand, or name another version)",
            "update": f"~ {self.deployment}: {self.current}{beside}",
            "keep": f"= {self.deployment}: {self.current}{beside}",
            "unmanaged": f"? {self.deployment}: {self.current} (not in the config; left as it is)",
        }[self.action]
        return text + (f"; set {', '.join(self.settings)}" if self.settings else "")

    @property
    def is_drift(self) -> bool:
        return self.action in ("deploy", "swap", "canary", "promote", "halted", "update")


def plan_changes(actual: dict[str, State], desired: dict[str, State]) -> list[PlannedChange]:
    """What makes `actual` (what runs, per deployment) what `desired` asks."""
    changes = []
    for name, wanted in sorted(desired.items()):
        running = actual.get(name)
        if running is None:
            changes.append(PlannedChange(name, "deploy", None, wanted.version))
            continue
        settings = tuple(f for f in IN_PLACE if getattr(running, f) != getattr(wanted, f))
        new_options = running.engine_options != wanted.engine_options
        action = _how_to_reach(running, wanted, new_options) or ("update" if settings else "keep")
        changes.append(PlannedChange(name, action, running.version, wanted.version, settings, new_options, running.canary))
    changes += [PlannedChange(name, "unmanaged", actual[name].version, None) for name in sorted(set(actual) - set(desired))]
    return changes


def _how_to_reach(running: State, wanted: State, new_options: bool) -> Action | None:
    """How the file's version (and engine options) come to serve; None: they do already.
    Rule: a canary of the file's version is promoted, or left to roll out where the file
    asks for rollouts (new engine options wait for it); a new version goes out as a canary
    where the file asks and one can run (a loaded version, the same engine options), unless
    its canary was aborted (halted: nothing); every other change is a swap."""
    if running.version == wanted.version and not new_options:
        return None
    if running.canary == wanted.version:
        return "rolling" if wanted.rolls_out else "promote"
    if wanted.rolls_out and running.is_loaded and not new_options:
        return "halted" if running.aborted == wanted.version else "canary"
    return "swap"


def drift(changes: list[PlannedChange]) -> list[str]:
    """Where what runs differs from the file (an admin change since the last reload, say)."""
    return [change.describe() for change in changes if change.is_drift]


class Reconciler:
    def __init__(self, manager, registry):
        self._manager, self._registry = manager, registry

    def plan(self, config: ConfigFile) -> list[PlannedChange]:
        desired = {name: self._wanted(name, deployment) for name, deployment in config.deployments.items()}
        return plan_changes({d.name: _running(d) for d in self._manager.deployments}, desired)

    async def apply(self, config: ConfigFile, change: Change) -> list[dict]:
        """Each change in turn; one that fails is reported and the others still run."""
        results = []
        for planned in self.plan(config):
            result = asdict(planned) | {"status": "unchanged"}
            try:
                result |= await self._apply_one(planned, config.deployments.get(planned.deployment), change)
            except BatonError as error:
                result |= {"status": "failed", "error": str(error)}
            results.append(result)
        return results

    async def _apply_one(self, planned: PlannedChange, wanted: DeploymentConfig | None, change: Change) -> dict:
        manager, name = self._manager, planned.deployment
        if planned.action == "deploy":
            await manager.deploy(name, planned.desired, change, wanted.on_demand, wanted.idle_ttl_s, wanted.smoke_prompts, wanted.health, wanted.engine_options)
            return {"status": "succeeded"}
        outcome = {}
        if record := await self._change_version(planned, wanted, change):
            outcome = {"status": record.status, "swap": record.id, "strategy": record.strategy}
        if "on_demand" in planned.settings:
            await manager.set_on_demand(name, wanted.on_demand, wanted.idle_ttl_s)
        if planned.settings:
            manager.configure(name, wanted.smoke_prompts, wanted.health, wanted.idle_ttl_s)
            outcome = {"status": "succeeded"} | outcome
        return outcome

    async def _change_version(self, planned: PlannedChange, wanted: DeploymentConfig, change: Change):
        """The swap, canary or promotion that brings the file's version; None where none is due."""
        manager, name = self._manager, planned.deployment
        if planned.action == "swap":
            return await manager.swap(name, planned.desired, wanted.strategy, change, engine_options=wanted.engine_options)
        if planned.action == "promote":
            return await manager.promote_canary(name, change)
        if planned.action == "canary":
            if planned.canary is not None:
                await manager.abort_canary(name, change)
            return await manager.start_canary(name, planned.desired, wanted.canary.weight, change, wanted.canary.analysis, wanted.canary.mirror)
        return None

    def _wanted(self, deployment: str, wanted: DeploymentConfig) -> State:
        try:
            version = self._registry.resolve_for_serving(wanted.model).ref
        except BatonError as error:
            raise ConfigError(f"deployments.{deployment}.model: {error}") from error
        return State.of(version, wanted.on_demand, wanted.idle_ttl_s, wanted.smoke_prompts, wanted.health, wanted.engine_options, rolls_out=wanted.canary is not None)


def _running(deployment) -> State:
    on_demand, canary = deployment.on_demand, deployment.canary
    idle_ttl_s = on_demand.idle_ttl_s if on_demand else None
    rollout = {"canary": canary.version if canary else None, "is_loaded": deployment.active is not None, "aborted": deployment.aborted_canary}
    return State.of(deployment.target_version, on_demand is not None, idle_ttl_s, deployment.smoke_prompts, deployment.policy, deployment.engine_overrides, **rollout)
