"""The change feed on SQLite (issue 11, item 3: several worker processes on one host): the
neutral reader of ``feed`` (the rows, the consumers: ``changes``) following the file by
``PRAGMA data_version``.

A dedicated connection checks ``PRAGMA data_version`` (which moves when any other connection
commits, a look at shared memory, no I/O: on the event loop) every ``interval_s``, and only
then reads the rows after the last one it saw, on a thread of its own. Seq numbers are
assigned by the one writer holding the write lock, so they are committed in order.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from devtrust.verifier.storage.changes import (
    DEVICE,
    LEASE,
    POLICY,
    REVOKED,
    TRUST,
    Batch,
    Change,
    GapHandler,
    Handler,
    check_lease,
    lease_holds,
    newest,
    read_after,
)
from devtrust.verifier.storage.feed import KEEP, PRUNE_EVERY_S, FeedReader
from devtrust.verifier.storage.sql import Engine
from devtrust.verifier.storage.sqlite_engine import BUSY_TIMEOUT_MS

__all__ = [
    "DEVICE",
    "KEEP",
    "LEASE",
    "POLICY",
    "POLL_S",
    "REVOKED",
    "TRUST",
    "Change",
    "GapHandler",
    "Handler",
    "SqliteChangeFeed",
    "check_lease",
    "lease_holds",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
# How often a process looks whether another committed: what others revoke or change reaches
# it within this (a certificate about to be handed out looks at once: ``catch_up``). Each
# look wakes a thread (about 0.05% of a core here at this rate; 0.25% at 20 a second).
POLL_S = 0.25


class SqliteChangeFeed(FeedReader):
    """``changes.ChangeFeed`` over an SQLite file."""

    def __init__(
        self,
        path: Path,
        engine: Engine,
        *,
        origin: str,
        interval_s: float = POLL_S,
        keep: int = KEEP,
        prune_every_s: float = PRUNE_EVERY_S,
    ) -> None:
        super().__init__(engine, origin=origin, keep=keep, prune_every_s=prune_every_s)
        self._path = path
        self._interval_s = interval_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-changes")
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(str(self._path.resolve()))}?mode=ro"
        return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)

    def _watch(self, wake: Callable[[], None]) -> None:
        """The loop is told when another connection committed."""
        db = self._connect()
        try:
            last = None
            while not self._stopping.wait(self._interval_s):
                try:
                    version = int(db.execute("PRAGMA data_version").fetchone()[0])
                except sqlite3.Error:
                    logger.exception("change feed: cannot read the database's data version")
                    version = -1
                if version != last:
                    last = version
                    wake()
        finally:
            db.close()

    async def _call(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def _open(self) -> int:
        return await self._call(self._open_connection)

    def _open_connection(self) -> int:
        db = self._connect()
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db = db
        self._version = int(db.execute("PRAGMA data_version").fetchone()[0])
        return newest(db)

    def _mark(self) -> int:
        """Moves whenever another connection commits (a look at shared memory, no I/O).
        Called with the lock held: the feed's thread is not using the connection."""
        if self._db is None:
            raise RuntimeError("ChangeFeed.open was not awaited")
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    async def _fetch(self) -> Batch:
        return await self._call(self._read)

    def _read(self) -> Batch:
        db = self._db
        if db is None:
            raise RuntimeError("ChangeFeed.open was not awaited")
        db.execute("BEGIN")
        try:
            return read_after(db, self._seq)
        finally:
            db.execute("COMMIT")

    async def _release(self) -> None:
        await self._call(self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
