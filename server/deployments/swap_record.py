"""What a swap did: its phases with durations, its outcome, and why."""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from models.errors import ConflictError, NotFoundError, SwapFailedError


@dataclass
class Phase:
    name: str
    started_at: float
    duration_s: float | None = None
    detail: str = ""


@dataclass
class SwapRecord:
    deployment: str
    action: str  # deploy, swap, rollback, canary, step, promote, abort, load, unload, recover, remove
    from_version: str | None
    to_version: str | None
    strategy: str
    actor: str
    reason: str = ""  # the operator's
    strategy_reason: str = ""  # why this strategy: the choice `auto` made, or "asked for"
    id: str = field(default_factory=lambda: "swap-" + uuid.uuid4().hex[:12])
    status: str = "running"  # running, succeeded, failed
    error: str | None = None
    phases: list[Phase] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    num_cut_off: int = 0

    @asynccontextmanager
    async def phase(self, name: str):
        phase = Phase(name, time.time())
        self.phases.append(phase)
        started = time.perf_counter()
        try:
            yield phase
        finally:
            phase.duration_s = round(time.perf_counter() - started, 4)

    def finish(self, error: BaseException | None = None) -> None:
        self.status = "failed" if error else "succeeded"
        self.error = str(error) if error else None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "deployment": self.deployment,
            "action": self.action,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "status": self.status,
            "error": self.error,
            "actor": self.actor,
            "reason": self.reason,
            "started_at": self.started_at,
            "num_cut_off": self.num_cut_off,
            "phases": [vars(p) for p in self.phases],
        }


def as_swap_error(error: Exception, record: SwapRecord) -> BaseException:
    """What the caller of a failed change is told: what failed, what serves now, and why."""
    if isinstance(error, (ConflictError, NotFoundError)):
        return error  # an unknown or corrupt version, a conflict: say so as it is
    if record.action == "remove":
        return SwapFailedError(f"Removing {record.deployment} ({record.id}) did not end cleanly; it serves no requests any more. Reason: {error}")
    if record.action == "load":
        return SwapFailedError(f"Loading {record.to_version} for {record.deployment} on demand failed ({record.id}); the next request tries again. Reason: {error}")
    serving = f"{record.from_version} keeps serving" if record.from_version else f"{record.deployment} still has nothing loaded"
    return SwapFailedError(f"Swap {record.id} of {record.deployment} to {record.to_version} failed; {serving}. Reason: {error}")
