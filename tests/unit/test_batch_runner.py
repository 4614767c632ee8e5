"""The batch runner against its real stores on disk and a stand-in for the app (an honest
server that answers each request after a delay): the end of the completion window, a cancel
before anything ran, a key that lost its scope, a stop in the middle of finishing; and the
file store's per-key cap under uploads at once."""

from __future__ import annotations

import asyncio
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

from models.errors import InvalidRequestError
from server.batches.files import FileStore
from server.batches.in_process import Caller
from server.batches.runner import BatchRunner
from server.batches.store import BatchStore, new_batch


class SlowServer:
    """Answers every request with a 200 after `seconds`, and counts what it was asked."""

    def __init__(self, seconds: float):
        self.seconds, self.num_asked = seconds, 0

    async def post(self, path: str, body: dict, caller: Caller) -> tuple[int, dict, str]:
        self.num_asked += 1
        await asyncio.sleep(self.seconds)
        return 200, {"echo": body["messages"][0]["content"]}, f"req-{self.num_asked}"


def _setup(tmp_path, num_lines: int, server: SlowServer, caller=Caller(None), concurrency: int = 1):
    files, store = FileStore(tmp_path / "b.db", tmp_path / "files"), BatchStore(tmp_path / "b.db")
    lines = "\n".join(json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"content": f"q{n}"}]}}) for n in range(num_lines))
    upload = files.add("app", "in.jsonl", "batch", io.BytesIO(lines.encode()))
    runner = BatchRunner(store, files, tmp_path / "work", server, lambda owner: caller, lambda: False, concurrency)
    return runner, store, files, new_batch("/v1/chat/completions", upload["id"], "24h", {})


async def _until_ended(store: BatchStore, batch_id: str) -> dict:
    while (batch := store.get("app", batch_id))["status"] not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.01)
    return batch


def test_a_batch_still_running_when_its_window_ends_is_expired_with_what_it_answered(tmp_path):
    async def scenario():
        runner, store, files, batch = _setup(tmp_path, 20, SlowServer(0.05))
        batch["expires_at"] = time.time() + 0.3
        store.add("app", batch)
        runner.start("app", batch)
        return await _until_ended(store, batch["id"]), files

    batch, files = asyncio.run(scenario())
    assert batch["output_file_id"], (batch["status"], batch["request_counts"], batch["expires_at"] - batch["created_at"])
    answered = files.path("app", batch["output_file_id"]).read_text().splitlines()
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert 1 <= len(answered) == batch["request_counts"]["completed"] < 20


def test_a_batch_cancelled_before_it_ran_asks_nothing_and_writes_no_file(tmp_path):
    async def scenario():
        server = SlowServer(0.01)
        runner, store, _, batch = _setup(tmp_path, 5, server)
        store.add("app", batch)
        cancelling = await runner.cancel("app", batch["id"])  # as it was made, before its run began
        runner.start("app", batch)
        return cancelling, await _until_ended(store, batch["id"]), server

    cancelling, batch, server = asyncio.run(scenario())
    assert cancelling["status"] == "cancelling" and batch["status"] == "cancelled"
    assert server.num_asked == 0 and batch["output_file_id"] is None


def test_a_batch_whose_key_lost_its_scope_fails_and_asks_nothing(tmp_path):
    async def scenario():
        server = SlowServer(0.01)
        runner, store, _, batch = _setup(tmp_path, 5, server, caller=None)
        store.add("app", batch)
        runner.start("app", batch)
        return await _until_ended(store, batch["id"]), server

    batch, server = asyncio.run(scenario())
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "key_not_found" and server.num_asked == 0


def test_a_batch_stopped_after_its_files_were_handed_over_finds_them_at_the_next_start(tmp_path):
    """The stop came between the file store taking the answers and the batch's last write:
    the next start ends the batch with that file, not without it."""

    async def scenario():
        runner, store, files, batch = _setup(tmp_path, 2, SlowServer(0.01))
        store.add("app", batch)
        runner.start("app", batch)
        ended = await _until_ended(store, batch["id"])
        store.update(batch["id"], lambda b: {**b, "status": "finalizing", "output_file_id": None})  # as the stop left it
        runner.resume_all()
        return ended, await _until_ended(store, batch["id"])

    ended, resumed = asyncio.run(scenario())
    assert ended["output_file_id"] and resumed["status"] == "completed" and resumed["output_file_id"] == ended["output_file_id"]


def test_uploads_at_once_never_pass_a_keys_file_cap_together(tmp_path):
    files = FileStore(tmp_path / "b.db", tmp_path / "files", max_bytes_per_owner=1000)

    def upload(_) -> bool:
        try:
            files.add("app", "x.jsonl", "batch", io.BytesIO(b"x" * 600))
        except InvalidRequestError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(upload, range(8))) == [False] * 7 + [True]
    assert files.bytes_of("app") == 600
