"""From the config file's desired deployments to what runs: a pure plan, then its changes
applied through the swap machinery (draining and verification as for any swap).

Rules: every ref is resolved before anything changes, so a file naming an unknown version
changes nothing; a deployment the file does not name is left as it is (reported
`unmanaged`); a new version, or new engine options (which need a new engine), is swapped
to; smoke prompts, the health policy, `on_demand` and its idle TTL change in place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from models.catalog import Change
from models.errors import BatonError, ConfigError
from server.config.file import ConfigFile, DeploymentConfig

Action = Literal["deploy", "swap", "update", "keep", "unmanaged"]
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

    @classmethod
    def of(cls, version, on_demand, idle_ttl_s, smoke_prompts, health, engine_options) -> State:
        return cls(
            version,
            on_demand,
            idle_ttl_s if on_demand else None,
            tuple(smoke_prompts) if smoke_prompts else None,
            json.dumps(health.model_dump(mode="json"), sort_keys=True),
            json.dumps(engine_options or {}, sort_keys=True),
        )


@dataclass(frozen=True)
class PlannedChange:
    deployment: str
    action: Action
    current: str | None
    desired: str | None
    settings: tuple[str, ...] = ()  # changed in place
    new_engine_options: bool = False  # the swap restarts the engine with them

    def describe(self) -> str:
        options = " with new engine options" if self.new_engine_options else ""
        text = {
            "deploy": f"+ {self.deployment}: deploy {self.desired}",
            "swap": f"~ {self.deployment}: swap {self.current} -> {self.desired}{options}",
            "update": f"~ {self.deployment}: {self.current}",
            "keep": f"= {self.deployment}: {self.current}",
            "unmanaged": f"? {self.deployment}: {self.current} (not in the config; left as it is)",
        }[self.action]
        return text + (f"; set {', '.join(self.settings)}" if self.settings else "")

    @property
    def is_drift(self) -> bool:
        return self.action in ("deploy", "swap", "update")


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
        action = "swap" if running.version != wanted.version or new_options else ("update" if settings else "keep")
        changes.append(PlannedChange(name, action, running.version, wanted.version, settings, new_options))
    changes += [PlannedChange(name, "unmanaged", actual[name].version, None) for name in sorted(set(actual) - set(desired))]
    return changes


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
        if planned.action == "swap":
            record = await manager.swap(name, planned.desired, wanted.strategy, change, engine_options=wanted.engine_options)
            outcome = {"status": record.status, "swap": record.id, "strategy": record.strategy}
        if "on_demand" in planned.settings:
            await manager.set_on_demand(name, wanted.on_demand, wanted.idle_ttl_s)
        if planned.settings:
            manager.configure(name, wanted.smoke_prompts, wanted.health, wanted.idle_ttl_s)
            outcome = {"status": "succeeded"} | outcome
        return outcome

    def _wanted(self, deployment: str, wanted: DeploymentConfig) -> State:
        try:
            version = self._registry.resolve_for_serving(wanted.model).ref
        except BatonError as error:
            raise ConfigError(f"deployments.{deployment}.model: {error}") from error
        return State.of(version, wanted.on_demand, wanted.idle_ttl_s, wanted.smoke_prompts, wanted.health, wanted.engine_options)


def _running(deployment) -> State:
    on_demand = deployment.on_demand
    version = deployment.target_version
    idle_ttl_s = on_demand.idle_ttl_s if on_demand else None
    return State.of(version, on_demand is not None, idle_ttl_s, deployment.smoke_prompts, deployment.policy, deployment.engine_overrides)
