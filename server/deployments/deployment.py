"""A deployment: the stable name clients send, and the slots behind it.

Rule: routing state (active, canary, standby, held) changes only through these methods (and
the canary's own step), on the event loop; a request takes its lease in one step, so it sees
either the old routing or the new one, never a mix, and keeps its slot until its last byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time

from dataclasses import asdict, dataclass, field

from models.errors import ModelNotFoundError, OverloadedError
from server.deployments.admission import Admission
from server.deployments.health import CanaryAnalysis, HealthPolicy, Slo, Window
from server.deployments.slot import Lease, Slot, SlotState, Target


@dataclass(frozen=True)
class OnDemand:
    """Loaded by its first request, unloaded after `idle_ttl_s` with nothing in flight.
    `target` is what the next load loads: read it only while nothing is loaded."""

    target: Target
    idle_ttl_s: float


@dataclass
class Canary:
    """A version beside the active one, sent `weight` percent of new requests, and copies of
    `mirror` percent of those the active version serves (their answers dropped: mirrors.py);
    its outcomes, copies' included, count in a window of their own, not in the active's."""

    slot: Slot
    weight: int
    analysis: CanaryAnalysis | None = None  # None: an operator promotes or aborts
    mirror: int = 0
    since: float = field(default_factory=time.monotonic)  # when it took its present share
    window: Window = field(default_factory=Window)

    @property
    def version(self) -> str:
        return self.slot.version

    def takes(self, user: str | None, draw: float) -> bool:
        """Whether a new request goes here: by `draw` (uniform in [0, 100)), or, for a request
        that names its `user`, by where the user falls. Rule: one user sees one version all
        through a canary (a conversation does not switch models mid-way), a step up only moves
        users onto the canary, and each canary version samples its own users."""
        return (draw if user is None else _percentile(f"{self.version}\0{user}")) < self.weight

    def step_to(self, weight: int) -> None:
        """Its next step: its share, and the time it has served at it, start anew."""
        self.weight, self.since = weight, time.monotonic()

    def saved(self) -> dict:
        """What a restart needs to start it again beside the active version."""
        return {"version": self.version, "weight": self.weight, "mirror": self.mirror, "analysis": self.analysis.model_dump() if self.analysis else None}

    def describe(self) -> dict:
        return {**self.slot.describe(), **self.saved(), "at_weight_s": round(time.monotonic() - self.since, 1), "window": _described(self.window)}


def _described(window: Window) -> dict:
    """A window's last minute as the health checks read it (a canary's copies included)."""
    return asdict(window.stats(time.monotonic()))


def _percentile(text: str) -> float:
    """Where `text` falls in [0, 100), the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") / 2**64 * 100


class Deployment:
    def __init__(
        self,
        name: str,
        active: Slot | None,
        max_waiting: int,
        max_wait_seconds: float,
        on_demand: OnDemand | None = None,
        engine_overrides: dict | None = None,
        max_running: int | None = None,
    ):
        """`active` is None for an on-demand deployment that is not loaded yet;
        `engine_overrides` win over every version's own engine options; at most
        `max_running` requests run at once (None: no cap), `max_waiting` more queue."""
        self.name = name
        self.admission = Admission(name, max_running, max_waiting, max_wait_seconds)
        self.policy = HealthPolicy()
        self.window = Window()  # outcomes of the active version's recent requests
        self.breaching: set[str] = set()  # what it misses ("slo", "golden"): alerted, routed to a fallback if it has one
        self.is_failed = False  # its engine died and it is being brought back
        self.serving_since = time.monotonic()  # when the active version took the traffic
        self.baseline: Slo | None = None  # objectives learnt from the active version, once taken
        self.engine_overrides = engine_overrides or {}
        self.active: Slot | None = active
        self.on_demand = on_demand
        self.canary: Canary | None = None
        self.standby: Slot | None = None
        self.previous_version: str | None = None  # what `rollback` returns to
        self.smoke_prompts: list[str] | None = None  # None: the server's default smoke prompts
        self.started_as: str | None = None  # the version the server's start-up settings named, if they did
        self.aborted_canary: str | None = None  # the version whose canary was aborted last, until a canary of it starts again
        self.swap_lock = asyncio.Lock()
        self._max_waiting = max_waiting
        self._max_wait_seconds = max_wait_seconds
        self._num_waiting = 0
        self._serving = asyncio.Event()
        if active is not None:
            self._serving.set()
        self._load_error: BaseException | None = None
        self._random = random.Random()

    @property
    def version(self) -> str | None:
        return self.active.version if self.active else None

    @property
    def target(self) -> Target | None:
        """What it serves: the active slot's target or, unloaded on demand, what its next
        request loads."""
        if self.active is not None:
            return self.active.target
        return self.on_demand.target if self.on_demand is not None else None

    @property
    def target_version(self) -> str | None:
        return self.target.version if self.target is not None else None

    @property
    def pinnable_versions(self) -> set[str]:
        """The versions a request may name instead of the deployment: the one it serves (or,
        unloaded on demand, loads next) and its canary's."""
        return {version for version in (self.target_version, self.canary.version if self.canary else None) if version}

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def needs_load(self) -> bool:
        """An on-demand deployment with nothing loaded and no swap or load under way."""
        return self.on_demand is not None and self.active is None and not self.swap_lock.locked()

    async def lease(self, version: str | None = None, user: str | None = None) -> Lease:
        """A lease on the active slot, or the canary by weight (`Canary.takes`, the request's
        `user`); with `version`, on the slot that serves it (404 if neither does by then: a
        swap took it away)."""
        if not self._serving.is_set():
            await self._wait_for_serving()
        if self.active is None:  # woken by a failed on-demand load
            raise self._load_error or OverloadedError(f"Deployment {self.name} has no version loaded; retry shortly.")
        if version is not None:
            return self._slot_serving(version).take_lease()
        if self.canary is not None and self.canary.takes(user, self._random.uniform(0, 100)):
            return self.canary.slot.take_lease()
        return self.active.take_lease()

    def _slot_serving(self, version: str) -> Slot:
        for role, slot in self.roles():
            if role != "standby" and slot.version == version:
                return slot
        raise ModelNotFoundError(f"The model '{version}' is not served by {self.name} now; it serves {self.version}.", param="model")

    def flip_to(self, slot: Slot) -> Slot | None:
        """Send new requests to `slot`; return the slot that served until now."""
        previous, self.active = self.active, slot
        slot.move_to(SlotState.READY, f"serving {self.name}")
        self.window.clear()  # another version: its health starts afresh
        self.breaching.clear()
        self.is_failed = False
        self.serving_since, self.baseline = time.monotonic(), None
        slot.last_used = time.monotonic()  # routed now: its idle time starts here, not at load
        if previous is not None:
            self.previous_version = previous.version
        self._serving.set()
        return previous

    @property
    def is_breaching(self) -> bool:
        return bool(self.breaching)

    @property
    def needs_fallback(self) -> bool:
        return bool(self.policy.fallbacks) and (self.is_failed or self.is_breaching)

    def hold_requests(self) -> Slot:
        """`replace`, `reload` and in-turn swaps: new requests wait (bounded) until `flip_to`
        or `restore`; returns the slot that served until now."""
        self._serving.clear()
        previous, self.active = self.active, None
        return previous

    def unload(self) -> Slot:
        """On-demand: nothing serves until the next request loads this version again."""
        self._serving.clear()
        previous, self.active = self.active, None
        self.on_demand = OnDemand(previous.target, self.on_demand.idle_ttl_s)
        return previous

    def retarget(self, target: Target) -> None:
        """On demand with nothing loaded: the next request loads `target` instead."""
        self.previous_version = self.on_demand.target.version
        self.on_demand = OnDemand(target, self.on_demand.idle_ttl_s)

    def begin_load(self) -> None:
        """An on-demand load starts: requests wait for it, not for an older outcome."""
        self._load_error = None
        self._serving.clear()

    def fail_waiting(self, error: BaseException) -> None:
        """A load failed (on demand, or restarting a dead engine): requests waiting for it, or
        arriving before the next load or flip, get `error`. The outcome stays set so no
        waiter can miss it."""
        self._load_error = error
        self._serving.set()

    def remove(self, error: BaseException) -> list[Slot]:
        """Removed: no slot serves it from now on, and requests waiting for one, or admitted
        before the removal, get `error`. Returns every slot it had, to drain and stop."""
        slots = self.slots()
        self.active = self.canary = self.standby = self.on_demand = None
        self.fail_waiting(error)
        return slots

    def restore(self, slot: Slot) -> None:
        """A failed `replace` puts the old version back without recording a flip."""
        self.active = slot
        slot.move_to(SlotState.READY, f"{self.name} restored")
        self._serving.set()

    def start_canary(self, slot: Slot, weight: int, analysis: CanaryAnalysis | None = None, mirror: int = 0) -> None:
        slot.move_to(SlotState.READY, f"canary of {self.name} at {weight}%" + (f", {mirror}% mirrored" if mirror else ""))
        self.canary = Canary(slot, weight, analysis, mirror)
        if self.aborted_canary == slot.version:  # tried again
            self.aborted_canary = None

    def end_canary(self) -> Slot:
        """Promoted: no new request goes to it; returns its slot."""
        canary, self.canary = self.canary, None
        return canary.slot

    def abort_canary(self) -> Slot:
        """As `end_canary`, and its version is remembered as aborted: a config file rolling it
        out does not start it again by itself."""
        self.aborted_canary = self.canary.version
        return self.end_canary()

    @property
    def judged_canary(self) -> Canary | None:
        """The canary, where baton judges it (it has an analysis)."""
        return self.canary if self.canary is not None and self.canary.analysis is not None else None

    def window_of(self, slot: Slot) -> Window:
        """Where a request's outcome counts: the canary's window, or the active version's."""
        return self.canary.window if self.canary is not None and slot is self.canary.slot else self.window

    def roles(self) -> list[tuple[str, Slot]]:
        """Its slots, each with its role: active, canary, standby."""
        canary = self.canary.slot if self.canary is not None else None
        return [(role, slot) for role, slot in (("active", self.active), ("canary", canary), ("standby", self.standby)) if slot is not None]

    def slots(self) -> list[Slot]:
        return [slot for _, slot in self.roles()]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "state": self.active.state.value if self.active else ("unloaded" if self.needs_load else "swapping"),
            "on_demand": {"idle_ttl_s": self.on_demand.idle_ttl_s, "version": self.target_version} if self.on_demand else None,
            "in_flight": sum(s.num_leases for s in self.slots()),
            "waiting": self.num_waiting + self.admission.num_waiting,
            "is_swapping": self.swap_lock.locked(),
            "active": self.active.describe() if self.active else None,
            "canary": self.canary.describe() if self.canary else None,
            "standby": self.standby.describe() if self.standby else None,
            "previous_version": self.previous_version,
            "aborted_canary": self.aborted_canary,
            "is_breaching": self.is_breaching,
            "baseline": self.baseline.model_dump() if self.baseline else None,
            "window": _described(self.window),  # the active version's recent requests
            "fallbacks": self.policy.fallbacks,
        }

    async def _wait_for_serving(self) -> None:
        if self._num_waiting >= self._max_waiting:
            raise OverloadedError(f"Deployment {self.name} is swapping and its queue is full ({self._max_waiting}); retry shortly.")
        self._num_waiting += 1
        try:
            await asyncio.wait_for(self._serving.wait(), self._max_wait_seconds)
        except TimeoutError as error:
            raise OverloadedError(f"Deployment {self.name} is swapping and did not come back within {self._max_wait_seconds:g} s; retry shortly.") from error
        finally:
            self._num_waiting -= 1
