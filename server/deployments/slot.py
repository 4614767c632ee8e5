"""A slot: one loaded engine serving one version, and the leases requests hold on it."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.engines.base import Engine


@dataclass(frozen=True)
class Target:
    """A version ready to load: where its weights are and how to run them."""

    version: str  # a registry ref such as chat@2, or "local"
    path: Path
    options: dict
    memory_bytes: int  # what it will hold of the memory budget once loaded (an estimate)


class SlotState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STANDBY = "standby"
    ASLEEP = "asleep"  # on standby with its accelerator memory given back (engine sleep mode)
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(eq=False)
class Slot:
    """Rule: only the deployment that owns a slot changes its state; requests change only
    the lease count, through `Lease`."""

    target: Target
    engine: Engine
    state: SlotState = SlotState.LOADING
    num_leases: int = 0
    is_cut_off: bool = False  # its drain deadline passed with requests in flight
    num_cut_off: int = 0
    last_used: float = field(default_factory=time.monotonic)  # when a lease was last taken or returned
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._drained.set()

    @property
    def version(self) -> str:
        return self.target.version

    @property
    def memory_bytes(self) -> int:
        return self.target.memory_bytes

    def take_lease(self) -> "Lease":
        self.num_leases += 1
        self.last_used = time.monotonic()
        self._drained.clear()
        return Lease(self)

    def idle_seconds(self) -> float:
        """How long nothing has used this slot; 0 while requests are in flight."""
        return 0.0 if self.num_leases else time.monotonic() - self.last_used

    def _return_lease(self) -> None:
        self.num_leases -= 1
        self.last_used = time.monotonic()
        if self.num_leases == 0:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> bool:
        """True when the last lease came back within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def describe(self) -> dict:
        return {"version": self.version, "state": self.state.value, "in_flight": self.num_leases, "engine": self.engine.name}


class Lease:
    """Held by one request from routing until its last byte; `release` may be called more
    than once (the stream's end and the response's cleanup both call it)."""

    def __init__(self, slot: Slot):
        self.slot = slot
        self._is_released = False

    @property
    def engine(self) -> Engine:
        return self.slot.engine

    def release(self) -> None:
        if not self._is_released:
            self._is_released = True
            self.slot._return_lease()
