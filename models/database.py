"""SQLite as baton keeps its state (the registry's catalog, kept Responses): WAL, safe from a
crash of the process (synchronous NORMAL: no fsync per commit), one short connection per
call, so any thread may call.

Rule: writes go through `transaction`, whose BEGIN IMMEDIATE takes the write lock up front, so
concurrent writers queue instead of failing half-way (two imports of the same content end as
one version)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(connect(path)) as db:
        yield db


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """Committed on leaving, rolled back on an error."""
    with closing(connect(path)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
