"""Work that goes on after its request was answered (Responses' `background: true`): a task
per run, which a later request can cancel and a shutdown cancels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from functools import partial

log = logging.getLogger(__name__)


class BackgroundRuns:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task] = {}

    def start(self, run_id: str, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks[run_id] = task
        task.add_done_callback(partial(self._ended, run_id))

    def _ended(self, run_id: str, task: asyncio.Task) -> None:
        self._tasks.pop(run_id, None)
        if not task.cancelled() and (error := task.exception()) is not None:  # a run records its own outcome; this is its recording failing
            log.error("background run %s failed", run_id, exc_info=error)

    async def cancel(self, run_id: str) -> None:
        """Cancel a run and wait for its end; one that ended already is left as it ended."""
        if (task := self._tasks.get(run_id)) is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def cancel_all(self) -> None:
        for run_id in list(self._tasks):
            await self.cancel(run_id)
