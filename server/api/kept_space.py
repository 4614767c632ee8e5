"""What each key keeps in responses.db (its Responses, stored chat completions and
conversation items), in bytes, and its cap (`max_kept_bytes_per_key`): without a cap, a
key could fill the disk that baton's registry and state share.

Rules:
- Triggers keep the count, so every write, delete and expiry counts in the transaction that
  makes it. A table's rows from before its triggers are counted once, as they are made.
- Responses and stored completions are kept as a cache: one that would take its key past
  the cap first drops that key's oldest (never a background Response still going).
- Conversation items go only when their owner deletes them: a write that would take a key
  past its cap once nothing else of its is left to drop is refused, whole (400).
- Without keys, every client is one owner: the cap is then the server's.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from models.errors import InvalidRequestError

SCHEMA = "CREATE TABLE IF NOT EXISTS kept_bytes (owner TEXT PRIMARY KEY, bytes INTEGER NOT NULL);"
DROPPED_AT_ONCE = 64  # oldest rows read per query while making room


@dataclass(frozen=True)
class Counted:
    """A table whose rows count: SQL for a row's owner and for its bytes, `{row}` naming the
    row; `droppable`: SQL for whether a row may go to make room (None: never)."""

    table: str
    owner: str
    size: str
    droppable: str | None = None

    def of(self, row: str) -> tuple[str, str]:
        return self.owner.format(row=row), self.size.format(row=row)


def _bytes_of_text(*columns: str) -> str:
    return " + ".join(f"length(CAST({{row}}.{column} AS BLOB))" for column in columns)


RESPONSES = Counted("responses", "{row}.owner", _bytes_of_text("response", "input_items"), droppable="status NOT IN ('queued', 'in_progress')")
COMPLETIONS = Counted("chat_completions", "{row}.owner", _bytes_of_text("completion", "messages"), droppable="1")
CONVERSATION_ITEMS = Counted("conversation_items", "(SELECT owner FROM conversations WHERE id = {row}.conversation_id)", _bytes_of_text("item"))
DROPPED_FIRST = (RESPONSES, COMPLETIONS)  # both expire at made + responses_ttl_s: the oldest expire first


def count(db: sqlite3.Connection, counted: Counted) -> None:
    """The count's table and `counted`'s triggers, made where missing (in a transaction)."""
    db.execute(SCHEMA)
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?", (f"{counted.table}_counted_in",)).fetchone():
        return
    (new_owner, new_size), (old_owner, old_size), (owner, size) = counted.of("new"), counted.of("old"), counted.of("kept")
    add = f"INSERT INTO kept_bytes (owner, bytes) VALUES ({new_owner}, {new_size}) ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes;"
    take = f"UPDATE kept_bytes SET bytes = bytes - ({old_size}) WHERE owner = {old_owner};"
    db.execute(f"CREATE TRIGGER {counted.table}_counted_in AFTER INSERT ON {counted.table} BEGIN {add} END")
    db.execute(f"CREATE TRIGGER {counted.table}_counted_out AFTER DELETE ON {counted.table} BEGIN {take} END")
    db.execute(f"CREATE TRIGGER {counted.table}_counted_change AFTER UPDATE ON {counted.table} BEGIN {take} {add} END")
    db.execute(
        f"INSERT INTO kept_bytes (owner, bytes) SELECT {owner}, SUM({size}) FROM {counted.table} AS kept WHERE true GROUP BY 1 "
        "ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes"
    )


def bytes_kept(db: sqlite3.Connection, owner: str) -> int:
    row = db.execute("SELECT bytes FROM kept_bytes WHERE owner = ?", (owner,)).fetchone()
    return row[0] if row else 0


def make_room(db: sqlite3.Connection, owner: str, needed: int, cap: int | None, what: str) -> None:
    """Drops `owner`'s oldest Responses and completions until `needed` more bytes fit under
    `cap` (in the caller's transaction); raises a 400 when they cannot."""
    if cap is None:
        return
    excess = bytes_kept(db, owner) + needed - cap
    while excess > 0:
        oldest = _oldest_droppable(db, owner)
        if not oldest:
            raise InvalidRequestError(
                f"The {what} would take this key past the {cap} bytes it may keep (max_kept_bytes_per_key), "
                "and nothing it keeps can make room (its conversations stay until deleted): delete some conversations.",
                code="storage_limit_exceeded",
            )
        for table, row_id, size in oldest:
            db.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,))
            excess -= size
            if excess <= 0:
                return


def _oldest_droppable(db: sqlite3.Connection, owner: str) -> list[tuple[str, str, int]]:
    """(table, id, bytes) of `owner`'s oldest droppable rows, of the tables this database has."""
    names = tuple(counted.table for counted in DROPPED_FIRST)
    present = {row[0] for row in db.execute(f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({', '.join('?' * len(names))})", names)}
    selects = [
        f"SELECT '{c.table}', id, expires_at, {c.size.format(row='kept')} FROM {c.table} AS kept WHERE owner = :owner AND {c.droppable}"
        for c in DROPPED_FIRST
        if c.table in present
    ]
    if not selects:
        return []
    rows = db.execute(" UNION ALL ".join(selects) + f" ORDER BY 3 LIMIT {DROPPED_AT_ONCE}", {"owner": owner}).fetchall()
    return [(table, row_id, size) for table, row_id, _, size in rows]
