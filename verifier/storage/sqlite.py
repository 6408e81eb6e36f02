"""The repositories over SQLite (WAL): one writer thread with group commit, reader threads
(``sqlite_engine``), numbered migrations at open (``sqlite_schema``), the change feed followed
by data_version (``sqlite_changes``). The repositories' code and SQL are the neutral ones
(``repositories``); nothing here runs on the event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from devtrust.verifier.storage.changes import ChangeFeed
from devtrust.verifier.storage.repositories import SqlRepositories
from devtrust.verifier.storage.sqlite_changes import SqliteChangeFeed
from devtrust.verifier.storage.sqlite_engine import (
    MAX_BATCH,
    CommitHook,
    Readers,
    SqliteEngine,
    Writer,
    open_database,
)
from devtrust.verifier.storage.trust_rows import record

# The decision's transaction by its old name (tests run it on a connection of their own).
_record = record


class SqliteRepositories(SqlRepositories):
    """Every repository over one SQLite file; made by ``open_sqlite``."""

    def __init__(self, path: Path, engine: SqliteEngine) -> None:
        super().__init__(engine)
        self._path = path
        self._sqlite = engine

    @property
    def location(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def engine(self) -> SqliteEngine:
        return self._sqlite

    def change_feed(self, origin: str) -> ChangeFeed:
        return SqliteChangeFeed(self._path, self._sqlite, origin=origin)


async def open_sqlite(
    path: Path,
    *,
    create: bool = True,
    read_only: bool = False,
    readers: int = 4,
    on_commit: CommitHook | None = None,
    max_batch: int = MAX_BATCH,
) -> SqliteRepositories:
    """The verifier's repositories over the SQLite file at ``path``, checked (quick_check)
    and migrated to this code's schema (a newer one is refused; ``read_only`` never
    migrates nor writes). ``on_commit`` sees the size of each committed batch."""
    db, mode = await asyncio.to_thread(open_database, path, create=create, read_only=read_only)
    writer = None if read_only else Writer(db, on_commit=on_commit, max_batch=max_batch)
    if read_only:
        db.close()
    engine = SqliteEngine(str(path), writer, Readers(path, mode, workers=readers))
    return SqliteRepositories(path, engine)
