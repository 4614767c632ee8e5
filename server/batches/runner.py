"""Batches carried out: the input file read and checked, each request served in-process
(in_process.py) at most `concurrency` at a time per batch, each answer appended to the
batch's output or error file as it comes, and the files handed to the file store at the end.

Rules:
- A batch's requests queue behind interactive ones: where a line sets no `priority`, it is
  BATCH_PRIORITY (lower is sooner; a key's own floor still applies).
- Answers are written, flushed, and counted one by one, so a batch that a stop of the server
  cut off runs on at the next start with only the requests not yet answered.
- A cancel stops new requests; those in flight finish, and the files hold what was answered.
  So does the end of the completion window (`expired`).
- A request refused because the server is shutting down is not an answer: it runs again
  after the restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path

from models.errors import BatonError
from server.batches.files import FileStore
from server.batches.in_process import Caller, InProcess
from server.batches.lines import BatchLine, answered_ids, output_line, read_lines
from server.batches.store import BatchStore, moved_to

log = logging.getLogger(__name__)

BATCH_PRIORITY = 10
DEFAULT_CONCURRENCY = 8  # enough to keep a continuous batch busy; the rest waits its turn here
BUSY = (429, 503)  # a full queue, a swap or a load in the way: asked again
RETRIES, RETRY_BASE_S = 5, 1.0  # about 1, 2, 4, 8, 16 s: a swap's or a cold start's time


class BatchRunner:
    def __init__(self, store: BatchStore, files: FileStore, work: Path, server: InProcess, caller_of: Callable[[str], Caller | None], is_stopping: Callable[[], bool], concurrency: int = DEFAULT_CONCURRENCY):
        """`work`: where running batches write their answers; `caller_of`: who a batch's
        requests are made as, from its creator's name, as the server's keys are now (None:
        that key may no longer make them)."""
        self.store, self.files = store, files  # the app's routes read them too
        self._work, self._server = work, server
        self._caller_of, self._is_stopping, self._concurrency = caller_of, is_stopping, concurrency
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancelled: dict[str, asyncio.Event] = {}
        self._writes = asyncio.Lock()

    def start(self, owner: str, batch: dict) -> None:
        self._cancelled[batch["id"]] = asyncio.Event()
        task = asyncio.ensure_future(self._run(owner, batch))
        self._tasks[batch["id"]] = task
        task.add_done_callback(lambda t, batch_id=batch["id"]: self._ended(batch_id, t))

    def resume_all(self) -> None:
        """At start-up: the batches a stop cut off go on where they were."""
        for owner, batch in self.store.unfinished():
            log.info("resuming batch %s (%s)", batch["id"], batch["status"])
            self.start(owner, batch)

    async def cancel(self, owner: str, batch_id: str) -> dict:
        """A batch still running moves to `cancelling` (its runner ends it `cancelled`); one
        that ended is left as it ended."""
        await asyncio.to_thread(self.store.get, owner, batch_id)  # another key's: unknown
        batch = await self._update(batch_id, lambda b: moved_to(b, "cancelling") if b["status"] in ("validating", "in_progress") else b)
        if batch["status"] == "cancelling" and (cancelled := self._cancelled.get(batch_id)) is not None:
            cancelled.set()
        return batch

    async def _update(self, batch_id: str, change: Callable[[dict], dict]) -> dict:
        """BatchStore.update off the event loop, one write at a time (so the counts written
        never go back)."""
        async with self._writes:
            return await asyncio.to_thread(self.store.update, batch_id, change)

    async def stop_all(self) -> None:
        """At shutdown: cut off, to run on at the next start."""
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _ended(self, batch_id: str, task: asyncio.Task) -> None:
        self._tasks.pop(batch_id, None)
        self._cancelled.pop(batch_id, None)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("batch %s failed", batch_id, exc_info=error)

    async def _run(self, owner: str, batch: dict) -> None:
        folder = self._work / batch["id"]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lines = await asyncio.to_thread(self._read_input, owner, batch)
        except Exception as error:  # the input file deleted meanwhile, say
            lines = _errors([{"code": "invalid_input_file", "message": str(error), "param": "input_file_id", "line": None}])
        if isinstance(lines, dict):  # what is wrong with the file
            await self._update(batch["id"], lambda b: moved_to(b, "failed", errors=lines))
            return
        if (caller := self._caller_of(owner)) is None:
            gone = _errors([{"code": "key_not_found", "message": f"The key {owner!r} that created this batch no longer has the inference scope.", "param": None, "line": None}])
            await self._update(batch["id"], lambda b: moved_to(b, "failed", errors=gone))
            return
        counts = {"total": len(lines), "completed": 0, "failed": 0}
        batch = await self._update(batch["id"], lambda b: moved_to(b, "in_progress", request_counts=counts) if b["status"] == "validating" else b)
        if batch["status"] == "in_progress":
            batch = await self._answer(batch, lines, folder, caller)
        is_expired = batch["status"] == "in_progress" and _unanswered(batch) and time.time() >= batch["expires_at"]
        if self._is_stopping() and batch["status"] == "in_progress" and _unanswered(batch) and not is_expired:
            return  # cut off by the shutdown: it goes on at the next start
        await self._finish(owner, batch, folder, "expired" if is_expired else None)

    def _read_input(self, owner: str, batch: dict) -> list[BatchLine] | dict:
        path = self.files.path(owner, batch["input_file_id"], "input_file_id")
        with path.open(encoding="utf-8", errors="replace") as text:
            lines, errors = read_lines(text, batch["endpoint"])
        return _errors([error.as_openai() for error in errors]) if errors else lines

    async def _answer(self, batch: dict, lines: list[BatchLine], folder: Path, caller: Caller) -> dict:
        """Every line not answered yet, `concurrency` at a time, until all are answered, the
        batch is cancelled, or its window ends. The batch, as it stands then."""
        outputs = {name: folder / f"{name}.jsonl" for name in ("output", "errors")}
        answered = await asyncio.to_thread(_answered_in, outputs.values())  # a resumed batch's files may be large: off the event loop
        counts = dict(batch["request_counts"])
        slots = asyncio.Semaphore(self._concurrency)
        cancelled = self._cancelled[batch["id"]]

        async def answer(line: BatchLine) -> None:
            try:
                if (served := await self._served(batch["endpoint"], line, caller)) is None:
                    return  # not an answer: it runs again after the restart
                status, body, request_id = served
                with outputs["output" if status < 400 else "errors"].open("a", encoding="utf-8") as out:
                    out.write(output_line(line.custom_id, status, body, request_id))
                counts["completed" if status < 400 else "failed"] += 1
                counted = dict(counts)
                await self._update(batch["id"], lambda b: {**b, "request_counts": counted})
            finally:
                slots.release()

        in_flight: set[asyncio.Future] = set()
        for line in lines:
            if line.custom_id in answered:
                continue
            await slots.acquire()
            if cancelled.is_set() or time.time() >= batch["expires_at"] or self._is_stopping():
                slots.release()
                break
            in_flight = {task for task in in_flight if not task.done()} | {asyncio.ensure_future(answer(line))}
        await asyncio.gather(*in_flight)
        return await self._update(batch["id"], lambda b: {**b, "request_counts": counts})

    async def _served(self, endpoint: str, line: BatchLine, caller: Caller) -> tuple[int, dict, str] | None:
        """(status, body, request id) of one request. Rules: a busy server is asked again,
        RETRIES times with backoff; a refusal because the server is shutting down is no
        answer (None); a failure inside baton is a 500 answer, not the batch's end."""
        body = {"priority": BATCH_PRIORITY, **line.body}
        for attempt in count():
            try:
                status, answer, request_id = await self._server.post(endpoint, body, caller)
            except Exception:
                log.exception("batch request %s failed inside baton", line.custom_id)
                return 500, BatonError("The request failed inside baton; see the server log.").to_body(), ""
            if status == 503 and self._is_stopping():
                return None
            if status not in BUSY or attempt == RETRIES:
                return status, answer, request_id
            await asyncio.sleep(RETRY_BASE_S * 2**attempt * random.uniform(0.5, 1.5))  # jittered: those turned away together do not return together

    async def _finish(self, owner: str, batch: dict, folder: Path, ending: str | None = None) -> None:
        """The answers handed to the file store (an empty file is none), and the batch ended,
        its files named in the same write: `ending`, else completed, or cancelled (from
        cancelling)."""
        ending = ending or {"in_progress": "completed", "finalizing": "completed", "cancelling": "cancelled"}[batch["status"]]
        await self._update(batch["id"], lambda b: moved_to(b, "finalizing") if b["status"] == "in_progress" else b)
        files = {}
        for name, field in (("output", "output_file_id"), ("errors", "error_file_id")):
            if (file_id := await asyncio.to_thread(self._handed_over, owner, f"{batch['id']}_{name}.jsonl", folder / f"{name}.jsonl")) is not None:
                files[field] = file_id
        await self._update(batch["id"], lambda b: moved_to(b, ending, **files))
        await asyncio.to_thread(_remove_folder, folder)

    def _handed_over(self, owner: str, filename: str, written: Path) -> str | None:
        """The file store's id for a batch's answers (None: there were none). Rule: a stop
        between handing the file over and ending the batch left it in the store already; the
        next start finds it there by its name, rather than losing it."""
        if written.exists() and written.stat().st_size:
            return self.files.take(owner, filename, "batch_output", written)["id"]
        return next((f["id"] for f in self.files.list(owner, "batch_output") if f["filename"] == filename), None)


def _unanswered(batch: dict) -> bool:
    counts = batch["request_counts"]
    return counts["completed"] + counts["failed"] < counts["total"]


def _errors(data: list[dict]) -> dict:
    return {"object": "list", "data": data}


def _answered_in(paths) -> set[str]:
    """The custom ids the answer files hold, each file first cut after its last whole line (a
    stop mid-write leaves half of one)."""
    answered: set[str] = set()
    for path in paths:
        if path.exists():
            content = path.read_bytes()
            content = content[: content.rfind(b"\n") + 1]
            path.write_bytes(content)
            answered |= answered_ids(content.decode("utf-8").splitlines())
    return answered


def _remove_folder(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
