"""From the config file's desired deployments to what runs: a pure plan, then its changes
applied through the swap machinery (draining and verification as for any swap).

Rules: every ref is resolved before anything changes, so a file naming an unknown version
changes nothing; a deployment the file does not name is left as it is (reported
`unmanaged`); only the version is converged (on-demand and health settings of a running
deployment change with a restart).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from models.catalog import Change
from models.errors import BatonError, ConfigError
from server.config_file import ConfigFile

Action = Literal["deploy", "swap", "keep", "unmanaged"]


@dataclass(frozen=True)
class PlannedChange:
    deployment: str
    action: Action
    current: str | None
    desired: str | None

    def describe(self) -> str:
        return {
            "deploy": f"+ {self.deployment}: deploy {self.desired}",
            "swap": f"~ {self.deployment}: swap {self.current} -> {self.desired}",
            "keep": f"= {self.deployment}: {self.current}",
            "unmanaged": f"? {self.deployment}: {self.current} (not in the config; left as it is)",
        }[self.action]


def plan_changes(actual: dict[str, str | None], desired: dict[str, str]) -> list[PlannedChange]:
    """What makes `actual` (deployment -> version it serves) what `desired` asks."""
    changes = []
    for name, version in sorted(desired.items()):
        if name not in actual:
            changes.append(PlannedChange(name, "deploy", None, version))
        else:
            changes.append(PlannedChange(name, "keep" if actual[name] == version else "swap", actual[name], version))
    changes += [PlannedChange(name, "unmanaged", actual[name], None) for name in sorted(set(actual) - set(desired))]
    return changes


def drift(changes: list[PlannedChange]) -> list[str]:
    """Where what runs differs from the file (an admin change since the last reload, say)."""
    return [change.describe() for change in changes if change.action in ("deploy", "swap")]


class Reconciler:
    def __init__(self, manager, registry):
        self._manager, self._registry = manager, registry

    def plan(self, config: ConfigFile) -> list[PlannedChange]:
        desired = {name: self._resolve(name, deployment.model) for name, deployment in config.deployments.items()}
        actual = {d.name: d.version or (d.on_demand.target.version if d.on_demand else None) for d in self._manager.deployments}
        return plan_changes(actual, desired)

    async def apply(self, config: ConfigFile, change: Change) -> list[dict]:
        """Each change in turn; one that fails is reported and the others still run."""
        results = []
        for planned in self.plan(config):
            result = asdict(planned) | {"status": "unchanged"}
            try:
                result |= await self._apply_one(planned, config, change)
            except BatonError as error:
                result |= {"status": "failed", "error": str(error)}
            results.append(result)
        return results

    async def _apply_one(self, planned: PlannedChange, config: ConfigFile, change: Change) -> dict:
        wanted = config.deployments.get(planned.deployment)
        if planned.action == "deploy":
            await self._manager.deploy(
                planned.deployment, planned.desired, change, wanted.on_demand, wanted.idle_ttl_s, wanted.smoke_prompts, wanted.health, wanted.engine_options
            )
            return {"status": "succeeded"}
        if planned.action == "swap":
            record = await self._manager.swap(planned.deployment, planned.desired, wanted.strategy, change)
            return {"status": record.status, "swap": record.id, "strategy": record.strategy}
        return {}

    def _resolve(self, deployment: str, ref: str) -> str:
        try:
            return self._registry.resolve_for_serving(ref).ref
        except BatonError as error:
            raise ConfigError(f"deployments.{deployment}.model: {error}") from error
