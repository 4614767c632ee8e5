"""Work that goes on after its request was answered (Responses' `background: true`): a task
per run, which a later request can cancel and a shutdown cancels; a streamed run's events,
which a client that lost its connection reads again from where it was."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from functools import partial

log = logging.getLogger(__name__)

# Rule: a streamed run's events are kept in memory while it runs and this long after it ends,
# for a client to resume; not over a restart. The Response itself is kept in the store. Of the
# runs that ended, the events of at most MAX_ENDED_LOGS are kept (the oldest go first), so
# that a burst of long answers cannot fill the memory.
KEEP_EVENTS_S = 600.0
MAX_ENDED_LOGS = 256


class EventLog:
    """A streamed run's server-sent events in order; event i has sequence number i."""

    def __init__(self) -> None:
        self._events: list[str] = []
        self._grew = asyncio.Event()
        self.is_closed = False

    def append(self, event: str) -> None:
        self._events.append(event)
        self._wake()

    def close(self) -> None:
        self.is_closed = True
        self._wake()

    def _wake(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()

    async def follow(self, starting_after: int | None = None) -> AsyncIterator[str]:
        """The events after sequence number `starting_after` (all, without one), then each as
        it comes, until the run ends."""
        index = 0 if starting_after is None else starting_after + 1
        while True:
            grew = self._grew
            while index < len(self._events):
                yield self._events[index]
                index += 1
            if self.is_closed:
                return
            await grew.wait()


class BackgroundRuns:
    def __init__(self, keep_events_s: float = KEEP_EVENTS_S, max_ended_logs: int = MAX_ENDED_LOGS) -> None:
        self._tasks: dict[str, asyncio.Task] = {}
        self._logs: dict[str, EventLog] = {}
        self._ended_logs: deque[str] = deque()  # the runs that ended with a log, oldest first
        self._keep_events_s, self._max_ended_logs = keep_events_s, max_ended_logs

    def start(self, run_id: str, work: Awaitable[None], events: EventLog | None = None) -> None:
        """Run `work`; where it writes `events`, they can be followed (`events_of`) until
        `keep_events_s` after it ends."""
        task = asyncio.ensure_future(work)
        self._tasks[run_id] = task
        if events is not None:
            self._logs[run_id] = events
        task.add_done_callback(partial(self._ended, run_id))

    def events_of(self, run_id: str) -> EventLog | None:
        return self._logs.get(run_id)

    def _ended(self, run_id: str, task: asyncio.Task) -> None:
        self._tasks.pop(run_id, None)
        if (events := self._logs.get(run_id)) is not None:
            events.close()
            asyncio.get_running_loop().call_later(self._keep_events_s, self._logs.pop, run_id, None)
            self._ended_logs.append(run_id)
            while len(self._ended_logs) > self._max_ended_logs:
                self._logs.pop(self._ended_logs.popleft(), None)
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
