"""On-demand deployments: loaded by their first request, unloaded when idle past their TTL or
to make room for another's load.

Rules: however many requests find a deployment unloaded, it is loaded once. Room is made
by unloading idle on-demand deployments, least recently used first, never one with requests
in flight, nor an always-on one. Which deployment may be unloaded is decided by the pure
functions below; this class carries the loads and unloads out under the swap lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from models.errors import OverloadedError
from server.deployments.deployment import Deployment
from server.deployments.slot_lifecycle import SlotLifecycle
from server.deployments.swap_history import SwapHistory
from server.deployments.swap_record import SwapRecord, as_swap_error

log = logging.getLogger(__name__)


class OnDemandLoads:
    def __init__(self, deployments: Callable[[], list[Deployment]], slots: SlotLifecycle, history: SwapHistory, keep: Callable[[asyncio.Future], asyncio.Future]):
        self._deployments = deployments
        self._slots = slots
        self._history = history
        self._keep = keep
        self._loading: dict[str, asyncio.Future] = {}  # loads under way, by deployment

    def start_load(self, deployment: Deployment) -> asyncio.Future:
        """The one load of an unloaded on-demand deployment, however many ask for it."""
        name = deployment.name
        if name not in self._loading:
            deployment.begin_load()
            self._loading[name] = self._keep(asyncio.ensure_future(self._load(deployment)))
            self._loading[name].add_done_callback(lambda _: self._loading.pop(name, None))
        return self._loading[name]

    async def unload_idle_forever(self, check_every_s: float) -> None:
        while True:
            await asyncio.sleep(check_every_s)
            for deployment in filter(is_idle_past_ttl, self._deployments()):
                try:
                    await self.unload(deployment, f"idle for more than {deployment.on_demand.idle_ttl_s:g} s")
                except Exception:  # one engine that fails to stop must not end idle unloading for all
                    log.exception("could not unload idle deployment %s", deployment.name)

    async def drain_and_unload(self, deployment: Deployment, record: SwapRecord) -> None:
        """Under the swap lock: unrouted, drained, stopped. A request that arrived meanwhile
        waits for the load this starts (run once the lock is free), never loads beside the
        engine still exiting (on a GPU its memory is not free until then)."""
        async with record.phase("unroute"):
            slot = deployment.unload()
        await self._slots.drain(record, slot)
        async with record.phase("stop"):
            await self._slots.drop_standby(deployment)
            await self._slots.stop(slot)
        if deployment.num_waiting:
            self.start_load(deployment)

    async def unload(self, deployment: Deployment, reason: str) -> None:
        """Idle past its TTL, or evicted for room (nothing in flight): as an operator's unload."""
        record = SwapRecord(deployment.name, "unload", deployment.version, None, "on-demand", "baton", reason)
        async with deployment.swap_lock:
            await self.drain_and_unload(deployment, record)
        self._history.add_finished(record)

    async def _load(self, deployment: Deployment) -> None:
        target = deployment.on_demand.target
        record = SwapRecord(deployment.name, "load", None, target.version, "on-demand", "baton", "first request")
        self._history.add(record)
        try:
            async with deployment.swap_lock:
                async with record.phase("evict"):
                    await self._make_room(self._slots.needed_bytes(target), deployment)
                slot = await self._slots.load_and_verify(record, target, deployment)
                async with record.phase("flip"):
                    deployment.flip_to(slot)
            record.finish()
        except Exception as error:
            record.finish(error)
            deployment.fail_waiting(error if isinstance(error, OverloadedError) else as_swap_error(error, record))
        self._history.close(record)

    async def _make_room(self, memory_bytes: int, loading: Deployment) -> None:
        while not self._slots.fits_in_budget(memory_bytes):
            evicted = least_recently_used_idle(self._deployments(), loading)
            if evicted is None:
                raise OverloadedError(f"No room in the memory budget to load {loading.on_demand.target.version}: every loaded model is busy or always-on.")
            await self.unload(evicted, "evicted: least recently used")


def least_recently_used_idle(deployments: list[Deployment], loading: Deployment) -> Deployment | None:
    """The deployment to unload to make room for `loading`'s load: a loaded on-demand one with
    nothing in flight, no canary and no change under way, least recently used first; None if
    none may go."""
    idle = [d for d in deployments if d is not loading and d.on_demand and d.active and d.canary is None and d.active.num_leases == 0 and not d.swap_lock.locked()]
    return min(idle, key=lambda d: d.active.last_used, default=None)


def is_idle_past_ttl(deployment: Deployment) -> bool:
    active = deployment.active
    if not deployment.on_demand or active is None or deployment.canary is not None or deployment.swap_lock.locked():
        return False
    if deployment.num_waiting:  # woken by a load, not yet leased
        return False
    return active.idle_seconds() > deployment.on_demand.idle_ttl_s
