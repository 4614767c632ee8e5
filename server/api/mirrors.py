"""Mirrored requests: a canary with a `mirror` gets copies of that share of the requests its
deployment's active version serves, and their answers are dropped. So a new version meets
real traffic, its errors and latency judged as a canary's (its window, its analysis, its
metrics under its version), before any client reads a word of it; at weight 0 it serves
no client at all.

Rules:
- Nothing a copy does may be read later: chat, text completions, Messages, Responses,
  embeddings, scoring and reranking are copied, each made stateless (COPIED), and a
  Responses request that answers in a conversation is not copied (its answer would join the
  conversation).
- A copy is not a client's: it does not stream, keeps nothing (`store: false`), takes
  nothing from its key's rates, and is dropped, not made, while MAX_IN_FLIGHT copies of its
  deployment still run or no place is free there at once: it never takes a client's place
  in the queue (where it must wait after all, it waits behind every client's request:
  MIRROR_PRIORITY).
- A copy runs as the original's key (in-process, as a batch's requests do), pinned to the
  canary's version (`model: chat@5`): it never reaches the active version, nor is copied.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter

from starlette.requests import Request

from server.batches.in_process import Caller, InProcess
from server.deployments.router import Route
from server.deployments.slot import Lease

log = logging.getLogger(__name__)

MIRROR_PRIORITY = 100  # behind clients (0) and batches (10)
_LAST = {"priority": MIRROR_PRIORITY}
_WHOLE_LAST = {"stream": False, **_LAST}
COPIED = {  # the routes copied, and what a copy's request sets beside its model
    "/v1/chat/completions": {**_WHOLE_LAST, "store": False},
    "/v1/completions": _WHOLE_LAST,
    "/v1/responses": {**_WHOLE_LAST, "store": False, "background": False},  # unset `store` keeps a Response
    "/v1/messages": {"stream": False},  # Anthropic's keep nothing, and take no priority
    **dict.fromkeys(("/v1/embeddings", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"), _LAST),
}
MAX_IN_FLIGHT = 4  # copies of one deployment's requests running at once


def copy_decision(mirror: int, served_by_active: bool, is_pinned: bool, num_in_flight: int, has_free_place: bool, draw: float) -> str | None:
    """For a request its deployment's canary mirrors: with probability `mirror` percent
    (`draw`: uniform in [0, 100)), one the active version serves, not pinned to a version, is
    "copied", or "dropped" while MAX_IN_FLIGHT copies run or the deployment has no place
    free at once; None: not one to copy."""
    if not served_by_active or is_pinned or draw >= mirror:
        return None
    return "copied" if num_in_flight < MAX_IN_FLIGHT and has_free_place else "dropped"


def is_copyable(path: str, body: dict) -> bool:
    """A request of a copied route, whose copy would write nothing a client reads."""
    return path in COPIED and not (path == "/v1/responses" and body.get("conversation"))


def copy_of(path: str, body: dict, version: str) -> dict:
    """The request a copy sends to `path`: the original's, pinned to `version`, whole (no
    stream) where the route streams, kept nowhere, behind every client's request where the
    route takes a priority."""
    copied = {key: value for key, value in body.items() if key != "stream_options"}
    return {**copied, "model": version, **COPIED[path]}


class Mirrors:
    def __init__(self, server: InProcess):
        self._server = server
        self._in_flight: Counter[str] = Counter()  # copies running, by deployment
        self._tasks: set[asyncio.Task] = set()
        self._random = random.Random()

    async def copy(self, request: Request, route: Route, lease: Lease) -> None:
        """Sends a copy of `request` (served under `lease`) to its deployment's canary, where
        the canary mirrors it; returns at once. Rule: nothing of a copy, its making
        included, fails the original."""
        try:
            await self._copy(request, route, lease)
        except Exception:
            log.exception("could not copy request %s to its canary", request.state.request_id)

    async def _copy(self, request: Request, route: Route, lease: Lease) -> None:
        deployment = request.state.deployments.get(lease.deployment)
        canary = deployment.canary if deployment is not None else None
        if canary is None or not canary.mirror or request.url.path not in COPIED:
            return
        body = await request.json()  # read already: this is its cached copy
        if not is_copyable(request.url.path, body):
            return
        in_flight, has_free_place = self._in_flight[lease.deployment], deployment.admission.has_free_place
        decision = copy_decision(canary.mirror, lease.slot is deployment.active, route.version is not None, in_flight, has_free_place, self._random.uniform(0, 100))
        if decision is not None:
            request.state.metrics.mirrored.labels(lease.deployment, decision).inc()
        if decision != "copied":
            return
        body = copy_of(request.url.path, body, canary.version)
        self._in_flight[lease.deployment] += 1
        task = asyncio.ensure_future(self._send(request.url.path, body, Caller(request.state.key), lease.deployment))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, path: str, body: dict, caller: Caller, deployment: str) -> None:
        try:
            status, answer, request_id = await self._server.post(path, body, caller)
            if status != 200:  # counted in the canary's window already: said here for whoever reads the log
                log.info("mirrored request %s to %s: %s %s", request_id, body["model"], status, (answer or {}).get("error", {}).get("message"))
        except Exception:
            log.exception("a mirrored request to %s failed", body["model"])
        finally:
            self._in_flight[deployment] -= 1

    async def close(self) -> None:
        """At shutdown: copies still running are cancelled (no client waits for them)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
