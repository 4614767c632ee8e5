"""How many requests a deployment runs at once, and how many may wait for a place.

Rules: at most `max_running` hold a place; up to `max_waiting` more wait, the soonest
priority first (lower is sooner) and first come first served within one, for at most
`max_wait_s`; anyone beyond gets 503 with Retry-After at once, so overload costs a bounded
amount of memory and never ends in a timeout.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from models.errors import OverloadedError


class Admission:
    def __init__(self, name: str, max_running: int | None, max_waiting: int, max_wait_s: float):
        self._name = name
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._max_wait_s = max_wait_s
        self.num_running = 0
        self._waiters: list[tuple[int, int, asyncio.Future]] = []  # a heap of (priority, arrival, place)
        self._arrivals = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    @property
    def has_free_place(self) -> bool:
        """One more request would run at once, waiting for nothing."""
        return self._max_running is None or (self.num_running < self._max_running and not self._waiters)

    async def enter(self, priority: int = 0) -> None:
        if self.has_free_place:
            self.num_running += 1
            return
        if len(self._waiters) >= self._max_waiting:
            raise OverloadedError(f"Deployment {self._name} is at capacity ({self._max_running} running, {self._max_waiting} waiting); retry shortly.")
        waiter = (priority, next(self._arrivals), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, waiter)
        place = waiter[2]
        try:
            await asyncio.wait_for(asyncio.shield(place), self._max_wait_s)
        except TimeoutError as error:
            if not place.done():
                self._drop(waiter)
                raise OverloadedError(f"Deployment {self._name} had no free place within {self._max_wait_s:g} s; retry shortly.") from error
        except asyncio.CancelledError:  # the client left while waiting: give the place on
            if place.done():
                self.leave()
            else:
                self._drop(waiter)
            raise

    def leave(self) -> None:
        """A running request ended: its place goes to the soonest waiter, if any."""
        while self._waiters:
            place = heapq.heappop(self._waiters)[2]
            if not place.done():
                place.set_result(None)
                return
        self.num_running -= 1

    def _drop(self, waiter: tuple[int, int, asyncio.Future]) -> None:
        self._waiters.remove(waiter)
        heapq.heapify(self._waiters)
