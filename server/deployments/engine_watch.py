"""The engine watch: every idle_check_s, each serving deployment's engine is asked whether it
can still serve; one that died is replaced by the deployment's standby, or its version starts
again with backoff (recovery.py's delays). A canary whose engine died is unrouted and stopped
(every request sent to it would fail), recorded as an abort; a dead standby is stopped (a
swap to it would flip to an engine that cannot serve). The backoff is pure; this is the
loop and its side effects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from models.catalog import Change
from models.errors import OverloadedError, SwapFailedError
from server.config.settings import Settings
from server.deployments.deployment import Deployment
from server.deployments.recovery import restart_delay_s
from server.deployments.slot import Slot, SlotState, Target
from server.deployments.slot_lifecycle import SlotLifecycle
from server.deployments.swap_history import SwapHistory
from server.deployments.swap_record import SwapRecord
from server.observability.metrics import Metrics

log = logging.getLogger(__name__)

MAX_RESTARTS = 6  # of a dead engine's version, with backoff: about half a minute of trying


class EngineWatch:
    def __init__(self, deployments: Callable[[], list[Deployment]], slots: SlotLifecycle, history: SwapHistory, metrics: Metrics, settings: Settings, abort_canary: Callable[[str, Change], Awaitable]):
        """`abort_canary`: the manager's, as an operator's abort runs (recorded, saved)."""
        self._deployments = deployments
        self._abort_canary = abort_canary
        self._slots = slots
        self._history = history
        self._metrics = metrics
        self._settings = settings

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.idle_check_s)
            for role, act in (("active", self.recover), ("canary", self.drop_canary), ("standby", self.drop_standby)):
                for deployment in (d for d in self._deployments() if _is_dead(d, role)):
                    try:
                        await act(deployment)
                    except Exception:  # one deployment that cannot recover must not stop the others'
                        log.exception("could not deal with the dead %s engine of deployment %s", role, deployment.name)

    async def drop_standby(self, deployment: Deployment) -> None:
        """The standby's engine died: it is stopped, and a swap back loads its version anew."""
        version = deployment.standby.version
        self._metrics.engine_failures.labels(deployment.name, version).inc()
        log.warning("the standby %s of %s died; it is stopped", version, deployment.name)
        async with deployment.swap_lock:
            await self._slots.drop_standby(deployment)

    async def drop_canary(self, deployment: Deployment) -> None:
        """The canary's engine died (its requests have ended with an error): it is aborted,
        and its share of requests goes back to the active version."""
        self._metrics.engine_failures.labels(deployment.name, deployment.canary.version).inc()
        await self._abort_canary(deployment.name, Change("baton", "the canary's engine died"))

    async def recover(self, deployment: Deployment) -> None:
        """The active engine died: its requests have ended with an error. New ones wait while
        the standby takes over (if there is one) or the same version starts again, with
        backoff; after a failed start, waiting requests get a 503 at once instead of waiting.
        After MAX_RESTARTS failed starts the deployment stays down (503s, or its fallbacks)
        until an operator swaps it to a version that starts."""
        dead = deployment.active
        self._metrics.engine_failures.labels(deployment.name, dead.version).inc()
        record = SwapRecord(deployment.name, "recover", dead.version, dead.version, "restart", "baton", "the engine died")
        self._history.add(record)
        async with deployment.swap_lock:
            deployment.is_failed = True  # its fallbacks serve meanwhile, where it has some
            deployment.hold_requests()
            dead.move_to(SlotState.FAILED, "engine died")
            async with record.phase("stop"):
                await self._slots.stop(dead)
            try:
                slot = await self._bring_up(deployment, record, dead.target)
            except Exception as error:
                record.finish(error)
                self._history.close(record)
                return
            async with record.phase("flip"):
                deployment.flip_to(slot)
        record.finish()
        self._history.close(record)

    async def _bring_up(self, deployment: Deployment, record: SwapRecord, target: Target) -> Slot:
        standby, deployment.standby = deployment.standby, None
        if standby is not None:
            try:
                if standby.state is SlotState.ASLEEP:
                    await self._slots.wake_or_stop(record, standby)
            except Exception:
                log.exception("the standby %s could not take over; restarting %s", standby.version, target.version)
            else:
                record.strategy, record.to_version = "standby", standby.version
                return standby
        for num_failed in range(MAX_RESTARTS):
            await asyncio.sleep(restart_delay_s(num_failed))
            try:
                return await self._slots.load_and_verify(record, target, deployment)
            except Exception as error:
                log.warning("restart %d of %s failed: %s", num_failed + 1, target.version, error)
                deployment.fail_waiting(OverloadedError(f"Deployment {deployment.name} lost its engine and is restarting it; retry shortly."))
        down = f"Deployment {deployment.name} lost its engine and {target.version} failed to start {MAX_RESTARTS} times; an operator must swap it to a version that starts."
        deployment.fail_waiting(OverloadedError(down))
        raise SwapFailedError(down)


def _is_dead(deployment: Deployment, role: str) -> bool:
    """The deployment's active or canary slot (serving), or its standby (awake: an engine
    asleep cannot say, and one that cannot wake is stopped when a swap wakes it), whose
    engine says it cannot serve any more; not while the deployment is swapping."""
    slot = dict(deployment.roles()).get(role)
    serving = SlotState.STANDBY if role == "standby" else SlotState.READY
    return slot is not None and slot.state is serving and not deployment.swap_lock.locked() and not slot.engine.health().is_ready
