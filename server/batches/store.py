"""Batches as OpenAI's Batch API shows them, kept in SQLite (database.py) so that a restart
finds the unfinished ones and runs them on.

Rules:
- Only the key that created a batch reads or cancels it; to any other key an id is unknown.
- A batch's record is the object the API returns; its status moves forward only:
  validating -> in_progress -> finalizing -> completed, or -> failed, -> cancelling ->
  cancelled, -> expired.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from models.database import reading, transaction
from models.errors import NotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
"""
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOW_S = {"24h": 24 * 3600}


def new_batch(endpoint: str, input_file_id: str, completion_window: str, metadata: dict[str, str]) -> dict:
    now = int(time.time())
    return {
        "id": "batch_" + uuid.uuid4().hex,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + COMPLETION_WINDOW_S[completion_window],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }


def moved_to(batch: dict, status: str, **fields) -> dict:
    """The batch in `status`, stamped with when it got there (`<status>_at`, where it has one)."""
    stamp = {f"{status}_at": int(time.time())} if f"{status}_at" in batch else {}
    return {**batch, "status": status, **stamp, **fields}


class BatchStore:
    def __init__(self, path: Path):
        self._path = path
        with reading(path) as db:
            db.executescript(SCHEMA)

    def add(self, owner: str, batch: dict) -> None:
        with transaction(self._path) as db:
            db.execute("INSERT INTO batches (id, owner, status, created_at, record) VALUES (?, ?, ?, ?, ?)", (batch["id"], owner, batch["status"], batch["created_at"], json.dumps(batch)))

    def update(self, batch_id: str, change: Callable[[dict], dict]) -> dict:
        """`change` applied to the batch as it is now, in one transaction (a cancel and the
        runner's counts never overwrite each other); the batch as changed."""
        with transaction(self._path) as db:
            (record,) = db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,)).fetchone()
            batch = change(json.loads(record))
            db.execute("UPDATE batches SET status = ?, record = ? WHERE id = ?", (batch["status"], json.dumps(batch), batch_id))
        return batch

    def get(self, owner: str, batch_id: str) -> dict:
        with reading(self._path) as db:
            row = db.execute("SELECT record FROM batches WHERE id = ? AND owner = ?", (batch_id, owner)).fetchone()
        if row is None:
            raise NotFoundError(f"No batch with id {batch_id!r} is kept here (never created, or created with another key).", param="batch_id", code="batch_not_found")
        return json.loads(row[0])

    def list(self, owner: str) -> list[dict]:
        """Newest first."""
        with reading(self._path) as db:
            rows = db.execute("SELECT record FROM batches WHERE owner = ? ORDER BY created_at DESC, rowid DESC", (owner,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def unfinished(self) -> list[tuple[str, dict]]:
        """(owner, batch) for each batch a stop of the server left running."""
        with reading(self._path) as db:
            rows = db.execute(f"SELECT owner, record FROM batches WHERE status IN ({', '.join('?' * len(UNFINISHED))})", UNFINISHED).fetchall()
        return [(row[0], json.loads(row[1])) for row in rows]

    def summary(self) -> tuple[dict[str, int], int]:
        """Batches by status, and the requests the unfinished ones have yet to answer."""
        with reading(self._path) as db:
            by_status = dict(db.execute("SELECT status, COUNT(*) FROM batches GROUP BY status").fetchall())
        pending = 0
        for _, batch in self.unfinished():
            counts = batch["request_counts"]
            pending += counts["total"] - counts["completed"] - counts["failed"]
        return by_status, pending
