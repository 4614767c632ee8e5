"""The catalog: versions, aliases and history in SQLite (database.py).

Rule: every change and its history row commit in one transaction, so history never
disagrees with the state it describes.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path

from models.database import reading, transaction
from models.names import check_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    number INTEGER NOT NULL,
    digest TEXT NOT NULL,
    manifest TEXT NOT NULL,
    is_corrupt INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (model, number),
    UNIQUE (model, digest)
);
CREATE TABLE IF NOT EXISTS aliases (
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    number INTEGER NOT NULL,
    PRIMARY KEY (model, alias)
);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}'
);
"""


@dataclass(frozen=True)
class VersionRow:
    model: str
    number: int
    digest: str
    manifest: dict
    is_corrupt: bool
    created_at: str


@dataclass(frozen=True)
class Change:
    """Who did something and why: every change carries one into the history."""

    actor: str
    reason: str = ""

    def __post_init__(self):
        check_text(self.actor, "actor")
        check_text(self.reason, "reason")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Catalog:
    def __init__(self, path: Path):
        self._path = path
        with reading(self._path) as db:
            db.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS: safe to repeat, in its own transaction

    def add_version(self, model: str, manifest: dict, change: Change) -> tuple[VersionRow, bool]:
        """Register content under the next number, or return the version that has it already."""
        with transaction(self._path) as db:
            existing = db.execute("SELECT * FROM versions WHERE model = ? AND digest = ?", (model, manifest["digest"])).fetchone()
            if existing:
                return _version(existing), False
            number = _next_number(db, model)
            db.execute(
                "INSERT INTO versions (model, number, digest, manifest, created_at) VALUES (?, ?, ?, ?, ?)",
                (model, number, manifest["digest"], json.dumps(manifest), now()),
            )
            _record(db, change, "register", model, number, {"digest": manifest["digest"], "source": manifest["source"]})
            return _version(db.execute("SELECT * FROM versions WHERE model = ? AND number = ?", (model, number)).fetchone()), True

    def versions(self, model: str | None = None) -> list[VersionRow]:
        query, args = ("SELECT * FROM versions WHERE model = ?", (model,)) if model else ("SELECT * FROM versions", ())
        with reading(self._path) as db:
            return [_version(row) for row in db.execute(query + " ORDER BY model, number", args)]

    def aliases(self, model: str) -> dict[str, int]:
        with reading(self._path) as db:
            return dict(db.execute("SELECT alias, number FROM aliases WHERE model = ? ORDER BY alias", (model,)).fetchall())

    def set_alias(self, model: str, alias: str, number: int, change: Change) -> int | None:
        """Point `alias` at `number`; return where it pointed before."""
        with transaction(self._path) as db:
            before = db.execute("SELECT number FROM aliases WHERE model = ? AND alias = ?", (model, alias)).fetchone()
            db.execute("INSERT OR REPLACE INTO aliases (model, alias, number) VALUES (?, ?, ?)", (model, alias, number))
            previous = before[0] if before else None
            _record(db, change, "alias", model, number, {"alias": alias, "previous": previous})
            return previous

    def set_corrupt(self, model: str, number: int, is_corrupt: bool, problems: list[str], change: Change) -> None:
        with transaction(self._path) as db:
            db.execute("UPDATE versions SET is_corrupt = ? WHERE model = ? AND number = ?", (int(is_corrupt), model, number))
            _record(db, change, "verify", model, number, {"is_corrupt": is_corrupt, "problems": problems})

    def delete_version(self, model: str, number: int, change: Change) -> None:
        with transaction(self._path) as db:
            db.execute("DELETE FROM versions WHERE model = ? AND number = ?", (model, number))
            db.execute("DELETE FROM aliases WHERE model = ? AND number = ?", (model, number))
            _record(db, change, "delete", model, number, {})

    def record(self, change: Change, action: str, model: str, version: int | None, details: dict) -> None:
        with transaction(self._path) as db:
            _record(db, change, action, model, version, details)

    def save_deployment(self, name: str, state: dict) -> None:
        """What a server serves under `name` (version and settings), to restore after a restart."""
        with transaction(self._path) as db:
            db.execute("INSERT OR REPLACE INTO deployments (name, state, updated_at) VALUES (?, ?, ?)", (name, json.dumps(state), now()))

    def forget_deployment(self, name: str) -> None:
        with transaction(self._path) as db:
            db.execute("DELETE FROM deployments WHERE name = ?", (name,))

    def saved_deployments(self) -> dict[str, dict]:
        with reading(self._path) as db:
            return {row["name"]: json.loads(row["state"]) for row in db.execute("SELECT name, state FROM deployments ORDER BY name")}

    def history(self, model: str) -> list[dict]:
        with reading(self._path) as db:
            rows = db.execute("SELECT * FROM history WHERE model = ? ORDER BY id", (model,)).fetchall()
        return [{**dict(row), "details": json.loads(row["details"])} for row in rows]


def _version(row: sqlite3.Row) -> VersionRow:
    return VersionRow(row["model"], row["number"], row["digest"], json.loads(row["manifest"]), bool(row["is_corrupt"]), row["created_at"])


def _record(db: sqlite3.Connection, change: Change, action: str, model: str, version: int | None, details: dict) -> None:
    db.execute(
        "INSERT INTO history (at, actor, action, model, version, reason, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (now(), change.actor, action, model, version, change.reason, json.dumps(details)),
    )


def _next_number(db: sqlite3.Connection, model: str) -> int:
    """Rule: a number is never given twice, even after its version is deleted (history keeps
    every registration), so a ref names one content for good: a deployment, a standby or a
    record that names chat@3 never meets other weights under that name."""
    query = "SELECT MAX(n) FROM (SELECT number AS n FROM versions WHERE model = ? UNION ALL SELECT version FROM history WHERE model = ? AND action = 'register')"
    return (db.execute(query, (model, model)).fetchone()[0] or 0) + 1
