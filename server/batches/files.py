"""Files (OpenAI's Files API), as batches need them: uploaded batch inputs and the output and
error files batches write. Content under `<home>/files/`, records in SQLite (database.py).

Rules:
- A file's path on disk is made here from an id made here; nothing a request sends is a path.
- Only the key that uploaded a file (or whose batch wrote it) reads or deletes it; to any
  other key an id is as unknown as one never made.
- A file appears whole or not at all: its content is written to a temporary name, then
  renamed, then recorded.
- A key's files (its uploads and its batches' outputs) take at most `max_bytes_per_owner`;
  an upload past it is refused, whole. A batch's output is written whatever it takes.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from models.database import reading, transaction
from models.errors import InvalidRequestError, NotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
"""
PURPOSES = ("batch", "batch_output")  # uploaded batch inputs; what batches write


class FileStore:
    def __init__(self, db_path: Path, folder: Path, max_bytes_per_owner: int | None = None):
        self._db_path, self._folder, self._max_bytes_per_owner = db_path, folder, max_bytes_per_owner
        self._admitting = threading.Lock()  # uploads run on worker threads: two at once must not pass the cap together
        folder.mkdir(parents=True, exist_ok=True)
        with reading(db_path) as db:
            db.executescript(SCHEMA)

    def add(self, owner: str, filename: str, purpose: str, content: BinaryIO) -> dict:
        """`content` copied in whole, then recorded."""
        file_id = "file-" + uuid.uuid4().hex
        partial = self._folder / f"{file_id}.partial"
        with partial.open("wb") as out:
            shutil.copyfileobj(content, out, 1 << 20)
        with self._admitting:
            if self._max_bytes_per_owner is not None and self.bytes_of(owner) + partial.stat().st_size > self._max_bytes_per_owner:
                partial.unlink()
                raise InvalidRequestError(
                    f"This key's files would take more than its {self._max_bytes_per_owner} bytes (max_file_bytes_per_key); delete some first.",
                    param="file",
                    code="storage_limit_exceeded",
                )
            return self._record(owner, file_id, filename, purpose, partial)

    def bytes_of(self, owner: str) -> int:
        with reading(self._db_path) as db:
            (total,) = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE owner = ?", (owner,)).fetchone()
        return total

    def take(self, owner: str, filename: str, purpose: str, written: Path) -> dict:
        """A file written elsewhere under the home (a batch's output), moved in and recorded."""
        file_id = "file-" + uuid.uuid4().hex
        return self._record(owner, file_id, filename, purpose, written)

    def _record(self, owner: str, file_id: str, filename: str, purpose: str, written: Path) -> dict:
        os.replace(written, self._folder / file_id)
        record = {"id": file_id, "object": "file", "bytes": (self._folder / file_id).stat().st_size, "created_at": int(time.time()), "filename": filename, "purpose": purpose}
        with transaction(self._db_path) as db:
            db.execute(
                "INSERT INTO files (id, owner, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (file_id, owner, filename, purpose, record["bytes"], record["created_at"]),
            )
        return record

    def get(self, owner: str, file_id: str, param: str | None = None) -> dict:
        with reading(self._db_path) as db:
            row = db.execute("SELECT id, bytes, created_at, filename, purpose FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone()
        if row is None:
            raise NotFoundError(f"No file with id {file_id!r} is kept here (never uploaded, uploaded with another key, or deleted).", param=param, code="file_not_found")
        return _record(row)

    def path(self, owner: str, file_id: str, param: str | None = None) -> Path:
        """Where a file's content is: the id as recorded, never as sent."""
        return self._folder / self.get(owner, file_id, param)["id"]

    def list(self, owner: str, purpose: str | None) -> list[dict]:
        """Newest first."""
        query, args = "SELECT id, bytes, created_at, filename, purpose FROM files WHERE owner = ?", [owner]
        if purpose is not None:
            query, args = query + " AND purpose = ?", [*args, purpose]
        with reading(self._db_path) as db:
            return [_record(row) for row in db.execute(query + " ORDER BY created_at DESC, rowid DESC", args)]

    def delete(self, owner: str, file_id: str) -> None:
        path = self.path(owner, file_id)
        with transaction(self._db_path) as db:
            db.execute("DELETE FROM files WHERE id = ?", (path.name,))
        path.unlink(missing_ok=True)


def _record(row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"], "filename": row["filename"], "purpose": row["purpose"]}
