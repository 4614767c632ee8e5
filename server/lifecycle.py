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
from collections.abc import Awaitable, Callable

import uvicorn

from models.errors import OverloadedError

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5
KILL_CHECK_S = 0.2  # how often the exit looks for engines still starting
# Rule: after the shutdown's drain, what is still running (a stream past the deadline, a
# follower of a background stream) has this long to send its last bytes, then is cut off.
CUT_OFF_S = 2.0


class ShuttingDownError(OverloadedError):
    default_code = "shutting_down"


class Lifecycle:
    def __init__(self) -> None:
        self.is_shutting_down = False
        self._num_in_flight: Callable[[], int] = lambda: 0
        self._shutdown_begun = asyncio.Event()

    def begin_shutdown(self) -> None:
        """On the event loop, at the first signal."""
        self.is_shutting_down = True
        self._shutdown_begun.set()

    async def unless_shutting_down(self, start_up: Awaitable[None]) -> bool:
        """Start-up's loads, cancelled by a shutdown that begins meanwhile: a signal during
        start-up waited for every engine to start (a minute each on a GPU) before the server
        could stop. An engine cut off mid-start is stopped at exit (GracefulServer.serve).
        True when `start_up` finished."""
        work, begun = asyncio.ensure_future(start_up), asyncio.ensure_future(self._shutdown_begun.wait())
        try:
            await asyncio.wait({work, begun}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            begun.cancel()
        if work.done():
            work.result()  # a failed start-up fails as it did
            return True
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return False

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

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout_s: float, kill_engines_starting: Callable[[], int] = lambda: 0):
        """`kill_engines_starting` kills the processes of engines still starting and says
        how many it killed (the engine factory knows whose processes they are)."""
        config.timeout_graceful_shutdown = CUT_OFF_S  # else uvicorn waits for every connection
        super().__init__(config)
        self._lifecycle = lifecycle
        self._shutdown_timeout_s = shutdown_timeout_s
        self._kill_engines_starting = kill_engines_starting
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)
        # Rules: the exit never waits for an engine still starting (a load the shutdown cut
        # short runs on in its thread, which the exit would wait for: a minute on a GPU, even
        # after a second signal): while threads remain, the processes of such engines are
        # killed (one may spawn later: its thread was still preparing), and the start fails.
        # What engines leave in reference cycles is collected here, while the interpreter can
        # still run their finalizers (vLLM's __del__ fails once modules are torn down).
        threads_done = asyncio.ensure_future(self._loop.shutdown_default_executor())
        while not threads_done.done():
            if num_killed := self._kill_engines_starting():
                log.warning("stopped %d process(es) of engines still starting", num_killed)
            await asyncio.wait({threads_done}, timeout=KILL_CHECK_S)
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
        self._lifecycle.begin_shutdown()
        if left := await self._lifecycle.drain(self._shutdown_timeout_s):
            log.warning("shutdown deadline passed with %d request(s) in flight; they end now", left)
        self.should_exit = True
