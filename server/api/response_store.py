"""Responses kept for `previous_response_id` and `GET /v1/responses/{id}`, as OpenAI keeps a
Response unless the request says `store: false`: SQLite under baton's home (database.py), so a
restart keeps them.

Rules:
- A Response is kept with its input items, those of the responses before it included, so
  a follow-up reads one row, and deleting an earlier response breaks no later one.
- Only the key that made a Response reads or deletes it (on a server without keys, any
  client): an id another key made is as unknown as one never made.
- A Response expires `ttl_s` after it was made; expired rows go as new ones are written.
- A key keeps at most `max_bytes_per_owner` of Responses, stored completions and
  conversations together: past it, its oldest Responses go first (kept_space.py).
- A background Response is kept as it goes (`in_progress`, then how it ended); one still
  unfinished when the store opens was cut off by a stop of the server: it is `failed`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from models.database import reading, transaction
from models.errors import NotFoundError
from server.api import kept_space

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at REAL NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires_at);
CREATE INDEX IF NOT EXISTS responses_by_owner ON responses (owner, expires_at);
"""
CUT_OFF = {"code": "server_error", "message": "The server stopped before this response finished; create it again."}


@dataclass(frozen=True)
class StoredResponse:
    response: dict  # as it was answered
    input_items: list[dict]  # every input item that led to it, the earlier responses' included

    @property
    def conversation(self) -> list[dict]:
        """What a follow-up continues: the input items, then this response's output."""
        return self.input_items + self.response["output"]


class ResponseStore:
    def __init__(self, path: Path, ttl_s: float, max_bytes_per_owner: int | None = None):
        self._path, self._ttl_s, self._max_bytes_per_owner = path, ttl_s, max_bytes_per_owner
        with reading(path) as db:
            db.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS: safe to repeat, in its own transaction
        with transaction(path) as db:
            kept_space.count(db, kept_space.RESPONSES)
            cut_off = db.execute("SELECT id, response FROM responses WHERE status IN ('queued', 'in_progress')").fetchall()
            for response_id, response in cut_off:
                failed = {**json.loads(response), "status": "failed", "error": CUT_OFF}
                db.execute("UPDATE responses SET status = 'failed', response = ? WHERE id = ?", (json.dumps(failed, ensure_ascii=False), response_id))

    def keep(self, owner: str, response: dict, input_items: list[dict]) -> None:
        """Keep `response`, or its newer state (a background one as it goes)."""
        now = time.time()
        texts = json.dumps(response, ensure_ascii=False), json.dumps(input_items, ensure_ascii=False)
        with transaction(self._path) as db:
            db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
            kept_space.make_room(db, owner, sum(len(text.encode()) for text in texts), self._max_bytes_per_owner, "response")
            db.execute(
                "INSERT INTO responses (id, owner, status, expires_at, response, input_items) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "status = excluded.status, expires_at = excluded.expires_at, response = excluded.response, input_items = excluded.input_items",
                (response["id"], owner, response["status"], now + self._ttl_s, *texts),
            )

    def get(self, owner: str, response_id: str, param: str | None = None) -> StoredResponse:
        with reading(self._path) as db:
            row = db.execute("SELECT response, input_items FROM responses WHERE id = ? AND owner = ? AND expires_at > ?", (response_id, owner, time.time())).fetchone()
        if row is None:
            raise _not_found(response_id, param)
        return StoredResponse(json.loads(row[0]), json.loads(row[1]))

    def delete(self, owner: str, response_id: str) -> None:
        with transaction(self._path) as db:
            if not db.execute("DELETE FROM responses WHERE id = ? AND owner = ? AND expires_at > ?", (response_id, owner, time.time())).rowcount:
                raise _not_found(response_id)


def _not_found(response_id: str, param: str | None = None) -> NotFoundError:
    return NotFoundError(f"No response with id {response_id!r} is stored here (never made, made with another key, deleted, or expired).", param=param, code="response_not_found")
