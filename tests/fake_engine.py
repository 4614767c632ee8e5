"""A fake engine for timing-sensitive swap tests: an honest implementation of the Engine
protocol (leases, aborts, stop ending pending generations) with configurable delays.
Every word of its output names the version, so a test can tell who served a response."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from server.engines.base import Chunk, EngineHealth, GenerationRequest
from models.errors import EngineError, EngineStoppedError


@dataclass(frozen=True)
class FakeBehaviour:
    start_seconds: float = 0.0
    token_seconds: float = 0.0
    fails_to_start: bool = False
    produces_nothing: bool = False
    sleeps: bool = False  # has a sleep mode, as vLLM on GPU: loaded, its device memory given back
    fails_to_wake: bool = False
    fails_to_reload: bool = False  # its reload raises once the old weights are half gone
    fails_requests: bool = False  # every generation fails with an engine error (a faulty version)
    stop_seconds: float = 0.0  # as vLLM's processes, which hold their memory until they exit
    refuses_adapters: bool = False  # loading a LoRA adapter fails (vLLM: a rank above max_lora_rank)


class FakeEngine:
    name = "fake"

    def __init__(self, label: str, behaviour: FakeBehaviour):
        self._label = self._first_label = label
        self._behaviour = behaviour
        self._is_running = False
        self.is_asleep = False
        self._running: dict[str, asyncio.Event] = {}  # request id -> stop signal
        self.adapters: dict[Path, str] = {}  # LoRA adapters loaded, as vLLM's multi-LoRA: folder -> name
        self.start_began_at: float | None = None  # time.monotonic(), for tests of what overlaps
        self.stop_began_at: float | None = None
        self.stopped_at: float | None = None

    @property
    def max_model_len(self) -> int:
        return 4096

    @property
    def vocab_size(self) -> int:
        return 1000

    @property
    def tokenizer(self):
        return None  # it reads text as words: no tool parser of vLLM's runs on it

    async def start(self) -> None:
        self.start_began_at = time.monotonic()
        await asyncio.sleep(self._behaviour.start_seconds)
        if self._behaviour.fails_to_start:
            raise RuntimeError(f"{self._label} failed to load")
        self._is_running = True

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split()) or 1))

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        return self.tokenize(" ".join(m["content"] for m in messages))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if not self._is_running or self.is_asleep:
            raise EngineStoppedError("The engine is not running." if not self.is_asleep else "The engine is asleep.")
        if self._behaviour.fails_requests:
            raise EngineError(f"{self._label} failed this generation (injected fault)")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise EngineStoppedError("The version's LoRA adapter was unloaded before this generation started.")
        label = self.adapters[request.adapter] if request.adapter is not None else self._label
        stopped = self._running[request.request_id] = asyncio.Event()
        try:
            count = 0 if self._behaviour.produces_nothing else request.sampling.max_tokens
            for index in range(count):
                try:
                    await asyncio.wait_for(stopped.wait(), self._behaviour.token_seconds)
                except TimeoutError:
                    pass
                if stopped.is_set():
                    raise EngineStoppedError("The engine stopped before this generation finished.")
                yield Chunk(f"{label} ", 1, "length" if index == count - 1 else None)
            if count == 0:
                yield Chunk("", 0, "stop")
        finally:
            self._running.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self._running[request_id].set()

    async def load_adapter(self, adapter: Path, name: str) -> None:
        """Its generations' words are `name`, so a test can tell which adapter served them."""
        if self._behaviour.refuses_adapters:
            raise RuntimeError(f"{self._label} cannot take the adapter of {name}")
        self.adapters[adapter] = name

    async def unload_adapter(self, adapter: Path) -> None:
        del self.adapters[adapter]

    def health(self) -> EngineHealth:
        return EngineHealth(self._is_running and not self.is_asleep, len(self._running), 0)

    @property
    def can_sleep(self) -> bool:
        return self._behaviour.sleeps

    async def sleep(self) -> None:
        assert self._behaviour.sleeps and not self._running, "only an idle engine with a sleep mode sleeps"
        self.is_asleep = True

    async def wake_up(self) -> None:
        if self._behaviour.fails_to_wake:
            raise RuntimeError(f"{self._label} failed to wake up")
        self.is_asleep = False

    async def reload_weights(self, path: Path) -> None:
        """As the real engines: whatever still generates ends, then the weights change."""
        for stopped in self._running.values():
            stopped.set()
        await asyncio.sleep(self._behaviour.token_seconds)
        if self._behaviour.fails_to_reload and path.name[:8] != self._first_label:
            self._label = "mixed"
            raise RuntimeError(f"reloading {path.name[:8]} failed half-way")
        self._label = path.name[:8]

    async def stop(self) -> None:
        self.stop_began_at = time.monotonic()
        self._is_running = False
        for stopped in self._running.values():
            stopped.set()
        await asyncio.sleep(self._behaviour.stop_seconds)
        self.stopped_at = time.monotonic()

    def die(self) -> None:
        """As a crashed engine process: health says so, generations in flight end with an error."""
        self._is_running = False
        for stopped in self._running.values():
            stopped.set()


class FakeEngineFactory:
    """Builds fake engines labelled by the model folder's name; `behaviours` maps a folder
    name to how its engine behaves."""

    def __init__(self, behaviours: dict[str, FakeBehaviour] | None = None, default: FakeBehaviour = FakeBehaviour()):
        self.behaviours = behaviours or {}
        self.default = default
        self.built: list[FakeEngine] = []  # every engine made, oldest first

    def __call__(self, path: Path, options: dict) -> FakeEngine:
        self.built.append(FakeEngine(path.name[:8], self.behaviours.get(path.name, self.default)))
        return self.built[-1]
