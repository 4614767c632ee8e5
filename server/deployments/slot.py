"""A slot: one loaded engine serving one version, and the leases requests hold on it.

A slot's state changes only through `move_to`, which checks the transition table and logs
every change (llama-swap's process states). Only the manager and the deployment that own a
slot move it; requests change only its leases.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from server.engines.base import Engine
from server.engines.generation_config import SamplingDefaults
from server.engines.options import OUTPUT_OPTIONS, engine_only

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A version ready to load: where its weights are, how to run them, and how requests
    sample from it where they do not say."""

    version: str  # a registry ref such as chat@2, or "local"
    path: Path
    options: dict
    memory_bytes: int  # what it will hold of the memory budget once loaded (an estimate)
    stored_bytes: int = 0  # its weights on disk: what it holds of host memory when asleep
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # its generation_config.json's
    adapter: Path | None = None  # an unmerged LoRA adapter, served beside the weights at `path`
    adapter_base: str | None = None  # the version the adapter was trained on (vLLM's model card calls it `parent`)
    # Targets with the same key share one running engine (shared_engine.py): a vLLM engine
    # with LoRA on, for a base and its unmerged adapters. None: an engine of its own.
    shared_engine_key: str | None = None

    @property
    def is_from_registry(self) -> bool:
        """A registry version (chat@2), not a local folder served as is."""
        return "@" in self.version


class SlotState(enum.Enum):
    LOADING = "loading"
    READY = "ready"  # taking new requests
    DRAINING = "draining"  # no new requests; in-flight ones finish (or its weights reload)
    STANDBY = "standby"  # loaded, routed nowhere: a flip away
    ASLEEP = "asleep"  # on standby with its accelerator memory given back (engine sleep mode)
    STOPPED = "stopped"
    FAILED = "failed"


S = SlotState
TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    S.LOADING: frozenset({S.READY, S.FAILED, S.STOPPED}),
    S.READY: frozenset({S.DRAINING, S.FAILED, S.STOPPED}),  # FAILED: its engine died
    # back to READY: a reload finished or failed, or a failed swap restored the old version
    S.DRAINING: frozenset({S.READY, S.STANDBY, S.ASLEEP, S.STOPPED}),
    S.STANDBY: frozenset({S.READY, S.STOPPED}),
    S.ASLEEP: frozenset({S.STANDBY, S.READY, S.STOPPED}),
    S.FAILED: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
}


class InvalidTransitionError(RuntimeError):
    """A slot was asked to make a move its state table forbids: a bug in baton, not input."""


@dataclass(eq=False)
class Slot:
    target: Target
    engine: Engine
    state: SlotState = SlotState.LOADING
    plan: str = ""  # what the memory plan chose for its engine, if anything
    last_used: float = field(default_factory=time.monotonic)  # when a lease was last taken or returned
    _leases: set["Lease"] = field(default_factory=set)
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._drained.set()

    @property
    def version(self) -> str:
        return self.target.version

    @property
    def memory_bytes(self) -> int:
        return self.target.memory_bytes

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    def move_to(self, state: SlotState, why: str = "") -> None:
        if state is self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransitionError(f"slot {self.version} cannot go from {self.state.value} to {state.value}")
        log.info("slot %s: %s -> %s%s", self.version, self.state.value, state.value, f" ({why})" if why else "")
        self.state = state

    def retarget(self, target: Target) -> None:
        """The engine now runs `target`'s weights (a reload). Rule: only while draining with
        no lease out but those cut off (they end with model_swapped), so every response names
        the version that produced it."""
        if self.state is not SlotState.DRAINING or any(not lease.is_cut_off for lease in self._leases):
            raise InvalidTransitionError(f"slot {self.version} can change version only while drained")
        log.info("slot %s: now serves %s", self.version, target.version)
        self.target = target

    def read_output_with(self, options: dict) -> None:
        """How the API reads this slot's output (tool_parser, reasoning_parser) changes at once, while it
        serves. Rule: nothing else may change this way; the engine runs on as it is."""
        if engine_only(options) != engine_only(self.target.options):
            raise InvalidTransitionError(f"slot {self.version}: only output options change in place")
        log.info("slot %s: output options now %s", self.version, {k: v for k, v in options.items() if k in OUTPUT_OPTIONS})
        self.target = replace(self.target, options=options)

    def take_lease(self) -> "Lease":
        lease = Lease(self)
        self._leases.add(lease)
        self.last_used = time.monotonic()
        self._drained.clear()
        return lease

    def cut_off(self) -> int:
        """The drain deadline passed: mark the leases still out, so that their requests end
        with model_swapped when the engine stops or reloads under them. Returns how many."""
        for lease in self._leases:
            lease.is_cut_off = True
        return len(self._leases)

    def idle_seconds(self) -> float:
        """How long nothing has used this slot; 0 while requests are in flight."""
        return 0.0 if self._leases else time.monotonic() - self.last_used

    def _return_lease(self, lease: "Lease") -> None:
        self._leases.discard(lease)
        self.last_used = time.monotonic()
        if not self._leases:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> bool:
        """True when the last lease came back within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def describe(self) -> dict:
        described = {
            "version": self.version,
            "state": self.state.value,
            "in_flight": self.num_leases,
            "engine": self.engine.name,
            "options": self.target.options,
            "sampling_defaults": self.target.sampling_defaults.as_dict(),
            "memory_bytes": self.memory_bytes,
        }
        if self.target.adapter is not None:
            described["lora_adapter_of"] = self.target.adapter_base  # unmerged, served beside its base's weights
        if self.target.shared_engine_key is not None:
            described["shared_engine"] = self.target.shared_engine_key
        return described | ({"memory_plan": self.plan} if self.plan else {})


class Lease:
    """Held by one request from routing until its last byte; `release` may be called more
    than once (the stream's end and the response's cleanup both call it)."""

    def __init__(self, slot: Slot):
        self.slot = slot
        self.is_cut_off = False  # still running when its slot's drain deadline passed
        self.deployment = ""  # the deployment that serves it
        self.fallback_from: str | None = None  # the deployment asked for, when a fallback serves
        self._is_released = False
        self._also_on_release: list[Callable[[], None]] = []

    def on_release(self, callback: Callable[[], None]) -> None:
        """Run `callback` once, when the lease is released (an admission place, say)."""
        self._also_on_release.append(callback)

    @property
    def engine(self) -> Engine:
        return self.slot.engine

    def release(self) -> None:
        if not self._is_released:
            self._is_released = True
            self.slot._return_lease(self)
            for callback in self._also_on_release:
                callback()
