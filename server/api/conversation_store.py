"""Conversations (OpenAI's Conversations API): a list of items that Responses made with
`conversation` read before their input and add to as they end. SQLite under baton's home,
beside the kept Responses (database.py), so a restart keeps them.

Rules:
- Only the key that made a conversation reads, changes or deletes it, or answers in it (on a
  server without keys, any client): an id another key made is as unknown as one never made.
- A conversation and its items are kept until deleted (no expiry, as OpenAI has it).
- Items keep their order; each has an id, unique in its conversation.
- A key keeps at most `max_bytes_per_owner` of conversations, Responses and stored
  completions together; items are never dropped to make room (kept_space.py).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from models.database import reading, transaction
from models.errors import InvalidRequestError, NotFoundError
from server.api import kept_space

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_items (
    conversation_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position),
    UNIQUE (conversation_id, id)
);
"""


class ConversationStore:
    def __init__(self, path: Path, max_bytes_per_owner: int | None = None):
        self._path, self._max_bytes_per_owner = path, max_bytes_per_owner
        with reading(path) as db:
            db.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS: safe to repeat
        with transaction(path) as db:
            kept_space.count(db, kept_space.CONVERSATION_ITEMS)

    def create(self, owner: str, items: list[dict], metadata: dict[str, str]) -> dict:
        conversation = {"id": "conv_" + uuid.uuid4().hex, "object": "conversation", "created_at": int(time.time()), "metadata": metadata}
        with transaction(self._path) as db:
            db.execute("INSERT INTO conversations (id, owner, created_at, metadata) VALUES (?, ?, ?, ?)", (conversation["id"], owner, conversation["created_at"], json.dumps(metadata)))
            self._append(db, owner, conversation["id"], items)
        return conversation

    def get(self, owner: str, conversation_id: str, param: str | None = None) -> dict:
        with reading(self._path) as db:
            return _conversation(db, owner, conversation_id, param)

    def update(self, owner: str, conversation_id: str, metadata: dict[str, str]) -> dict:
        with transaction(self._path) as db:
            _conversation(db, owner, conversation_id)
            db.execute("UPDATE conversations SET metadata = ? WHERE id = ?", (json.dumps(metadata), conversation_id))
            return _conversation(db, owner, conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        with transaction(self._path) as db:
            _conversation(db, owner, conversation_id)
            db.execute("DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def items(self, owner: str, conversation_id: str, param: str | None = None) -> list[dict]:
        """Every item, in the order they were added."""
        with reading(self._path) as db:
            _conversation(db, owner, conversation_id, param)
            rows = db.execute("SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY position", (conversation_id,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def add(self, owner: str, conversation_id: str, items: list[dict]) -> None:
        with transaction(self._path) as db:
            _conversation(db, owner, conversation_id)
            self._append(db, owner, conversation_id, items)

    def item(self, owner: str, conversation_id: str, item_id: str) -> dict:
        with reading(self._path) as db:
            _conversation(db, owner, conversation_id)
            row = db.execute("SELECT item FROM conversation_items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id)).fetchone()
        if row is None:
            raise _item_not_found(conversation_id, item_id)
        return json.loads(row[0])

    def delete_item(self, owner: str, conversation_id: str, item_id: str) -> dict:
        """The conversation, without the item."""
        with transaction(self._path) as db:
            conversation = _conversation(db, owner, conversation_id)
            if not db.execute("DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?", (conversation_id, item_id)).rowcount:
                raise _item_not_found(conversation_id, item_id)
        return conversation

    def _append(self, db, owner: str, conversation_id: str, items: list[dict]) -> None:
        rows = _rows(db, conversation_id, items)
        kept_space.make_room(db, owner, sum(len(row[3].encode()) for row in rows), self._max_bytes_per_owner, "conversation's items")
        db.executemany("INSERT INTO conversation_items (conversation_id, position, id, item) VALUES (?, ?, ?, ?)", rows)


def _conversation(db, owner: str, conversation_id: str, param: str | None = None) -> dict:
    row = db.execute("SELECT created_at, metadata FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)).fetchone()
    if row is None:
        raise NotFoundError(f"No conversation with id {conversation_id!r} is kept here (never made, made with another key, or deleted).", param=param, code="conversation_not_found")
    return {"id": conversation_id, "object": "conversation", "created_at": row[0], "metadata": json.loads(row[1])}


def _rows(db, conversation_id: str, items: list[dict]) -> list[tuple[str, int, str, str]]:
    """Rule: items whose ids the conversation has already (or repeat) are refused, all of them."""
    ids = [item["id"] for item in items]
    taken = {row[0] for row in db.execute(f"SELECT id FROM conversation_items WHERE conversation_id = ? AND id IN ({', '.join('?' * len(ids))})", (conversation_id, *ids))}
    if taken or len(set(ids)) < len(ids):
        repeated = sorted(taken or {i for i in ids if ids.count(i) > 1})
        raise InvalidRequestError(f"Each item of a conversation has an id of its own; {', '.join(repeated)} would be there twice.", param="items")
    (last,) = db.execute("SELECT COALESCE(MAX(position), -1) FROM conversation_items WHERE conversation_id = ?", (conversation_id,)).fetchone()
    return [(conversation_id, last + 1 + offset, item["id"], json.dumps(item, ensure_ascii=False)) for offset, item in enumerate(items)]


def _item_not_found(conversation_id: str, item_id: str) -> NotFoundError:
    return NotFoundError(f"No item {item_id!r} is in conversation {conversation_id!r}.", param="item_id", code="item_not_found")
