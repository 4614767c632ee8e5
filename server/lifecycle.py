"""The process's lifecycle: serving, then shutting down. SIGTERM starts the shutdown: `/ready`
answers 503, new requests get 503 with Retry-After, in-flight ones finish until the deadline,
then the server exits (and stops its engines, and any still starting). A second signal
exits at once.

A `Lifecycle` is made in `main` and passed to `create_app`; the signal handler only flips
it, and the drain runs on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable

import uvicorn

from models.errors import OverloadedError
from server.engines.vllm_engine import kill_engines_still_starting

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


class ShuttingDownError(OverloadedError):
    default_code = "shutting_down"


class Lifecycle:
    def __init__(self) -> None:
        self.is_shutting_down = False
        self._num_in_flight: Callable[[], int] = lambda: 0

    def track(self, num_in_flight: Callable[[], int]) -> None:
        """What the shutdown waits for: the app's requests in flight."""
        self._num_in_flight = num_in_flight

    def refuse_new_requests(self) -> None:
        if self.is_shutting_down:
            raise ShuttingDownError(f"The server is shutting down; retry in {RETRY_AFTER_S} s on another replica.")

    async def drain(self, timeout_s: float) -> int:
        """Wait until nothing is in flight or `timeout_s` passes; returns what is left."""
        deadline = time.monotonic() + timeout_s
        while (left := self._num_in_flight()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return left


class GracefulServer(uvicorn.Server):
    """uvicorn, with the shutdown above in place of its own (which closes the listener at
    once, so readiness probes would see a refused connection instead of a 503)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout_s: float):
        super().__init__(config)
        self._lifecycle = lifecycle
        self._shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)
        # Rules: the exit never waits for an engine still starting (a load the shutdown cut
        # short runs on in its thread, which the exit would wait for: a minute on a GPU, even
        # after a second signal): its processes are killed, and its thread fails at once.
        # What engines leave in reference cycles is collected here, while the interpreter can
        # still run their finalizers (vLLM's __del__ fails once modules are torn down).
        if num_killed := kill_engines_still_starting():
            log.warning("stopped %d process(es) of vLLM engines still starting", num_killed)
        await self._loop.shutdown_default_executor()
        gc.collect()

    def handle_exit(self, sig: int, frame) -> None:
        if self._lifecycle.is_shutting_down or self._loop is None:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        log.info("%s: shutting down; in-flight requests have %g s to finish", signal.Signals(sig).name, self._shutdown_timeout_s)
        self._lifecycle.is_shutting_down = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        if left := await self._lifecycle.drain(self._shutdown_timeout_s):
            log.warning("shutdown deadline passed with %d request(s) in flight; they end now", left)
        self.should_exit = True
