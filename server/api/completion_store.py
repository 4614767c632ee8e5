"""Chat completions kept with `store: true` (OpenAI's stored completions, for evals and
distillation): SQLite beside the kept Responses (database.py), so a restart keeps them.

Rules:
- Only the key that made a completion reads, changes or deletes it (on a server without
  keys, any client); an id another key made is as unknown as one never made.
- A completion expires `ttl_s` after it was made, as a kept Response does; expired rows go
  as new ones are written.
- Only its `metadata` changes after it is kept.
- A key keeps at most `max_bytes_per_owner` of completions, Responses and conversations
  together: past it, its oldest completions and Responses go first (kept_space.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from models.database import reading, transaction
from models.errors import NotFoundError
from server.api import kept_space

SCHEMA = """
CREATE TABLE IF NOT EXISTS chat_completions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    completion TEXT NOT NULL,
    messages TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_completions_by_owner ON chat_completions (owner, expires_at);
CREATE INDEX IF NOT EXISTS chat_completions_by_expiry ON chat_completions (expires_at);
"""


class CompletionStore:
    def __init__(self, path: Path, ttl_s: float, max_bytes_per_owner: int | None = None):
        self._path, self._ttl_s, self._max_bytes_per_owner = path, ttl_s, max_bytes_per_owner
        with reading(path) as db:
            db.executescript(SCHEMA)
        with transaction(path) as db:
            kept_space.count(db, kept_space.COMPLETIONS)

    def keep(self, owner: str, completion: dict, messages: list[dict]) -> None:
        """`completion` with its `metadata`; `messages`, the request's, each given an id."""
        now = time.time()
        numbered = [{**message, "id": f"{completion['id']}-{index}"} for index, message in enumerate(messages)]
        texts = json.dumps(completion, ensure_ascii=False), json.dumps(numbered, ensure_ascii=False)
        with transaction(self._path) as db:
            db.execute("DELETE FROM chat_completions WHERE expires_at <= ?", (now,))
            kept_space.make_room(db, owner, sum(len(text.encode()) for text in texts), self._max_bytes_per_owner, "chat completion")
            row = (completion["id"], owner, completion["model"], completion["created"], now + self._ttl_s, *texts)
            db.execute("INSERT INTO chat_completions (id, owner, model, created_at, expires_at, completion, messages) VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def get(self, owner: str, completion_id: str) -> dict:
        with reading(self._path) as db:
            return json.loads(_row(db, owner, completion_id)["completion"])

    def messages(self, owner: str, completion_id: str) -> list[dict]:
        with reading(self._path) as db:
            return json.loads(_row(db, owner, completion_id)["messages"])

    def list(self, owner: str, model: str | None, metadata: dict[str, str]) -> list[dict]:
        """Oldest first; those of `model` (any, without one) whose metadata has every pair of `metadata`."""
        query, args = "SELECT completion FROM chat_completions WHERE owner = ? AND expires_at > ?", [owner, time.time()]
        if model is not None:
            query, args = query + " AND model = ?", [*args, model]
        with reading(self._path) as db:
            completions = [json.loads(row[0]) for row in db.execute(query + " ORDER BY created_at, rowid", args)]
        return [c for c in completions if metadata.items() <= (c.get("metadata") or {}).items()]

    def update(self, owner: str, completion_id: str, metadata: dict[str, str]) -> dict:
        with transaction(self._path) as db:
            completion = {**json.loads(_row(db, owner, completion_id)["completion"]), "metadata": metadata}
            db.execute("UPDATE chat_completions SET completion = ? WHERE id = ?", (json.dumps(completion, ensure_ascii=False), completion_id))
        return completion

    def delete(self, owner: str, completion_id: str) -> None:
        with transaction(self._path) as db:
            _row(db, owner, completion_id)
            db.execute("DELETE FROM chat_completions WHERE id = ?", (completion_id,))


def _row(db, owner: str, completion_id: str):
    row = db.execute("SELECT completion, messages FROM chat_completions WHERE id = ? AND owner = ? AND expires_at > ?", (completion_id, owner, time.time())).fetchone()
    if row is None:
        raise NotFoundError(f"No chat completion with id {completion_id!r} is stored here (made without store: true, with another key, deleted, or expired).", param="completion_id", code="completion_not_found")
    return row
