"""SQLite off the event loop: one writer thread with group commit, and a pool of reader
threads, each with its own connection (WAL lets them read while the writer writes).

Group commit: the writer takes every write queued while it was busy and runs them in one
transaction, each in a savepoint of its own, then commits once; each caller's await returns
after that commit. A write that fails is rolled back to its savepoint and raises to its own
caller only; the others commit. Appraisals of a whole fleet thus cost one fsync per batch,
not one per device, and the event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from devtrust.core.errors import ConfigError
from devtrust.verifier.storage import sqlite_schema
from devtrust.verifier.storage.sql import SQLITE, Fragments

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BATCH = 256
# How long one connection waits for another's lock (several verifier processes may share
# the database: verifier/workers.py), and how many such waits a write lock is waited for.
BUSY_TIMEOUT_MS = 5000
BUSY_ATTEMPTS = 6
# Called by the writer thread after each commit with the number of writes it committed
# (tests count transactions with it; metrics will).
CommitHook = Callable[[int], None]


def _uri(path: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(str(path.resolve()))}?{mode}"


def open_database(path: Path, *, create: bool, read_only: bool) -> tuple[sqlite3.Connection, str]:
    """The checked, migrated connection (the writer's, or the only one when read-only) and
    the URI mode its readers open with. Refuses, one line each, what would hide or lose data
    (issue 8): a missing directory, or database (create=False: all but serve), is not made;
    read_only never writes it, nor migrates it."""
    named = "--database" if read_only else "`database:`"
    fix = f"fix {named}" + ("" if read_only else " in the configuration")
    if not path.parent.is_dir():
        raise ConfigError(
            f"database {path}: directory {path.parent} does not exist: create it, or {fix} "
            "(it is not created: a typo would show an empty fleet)"
        )
    if (read_only or not create) and not path.is_file():
        raise ConfigError(
            f"no verifier database at {path}: run `devtrust-verifier serve` once, or {fix}"
        )
    db = None
    try:
        if read_only:  # immutable (makes no -wal/-shm) unless a verifier has it open
            mode = "mode=ro" + ("" if Path(f"{path}-wal").exists() else "&immutable=1")
            db = sqlite3.connect(
                _uri(path, mode), uri=True, check_same_thread=False, isolation_level=None
            )
        else:
            mode = "mode=ro"
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        _prepare(db, path, read_only=read_only, fix=fix)
    except ConfigError:
        if db is not None:
            db.close()
        raise
    except sqlite3.Error as exc:
        if db is not None:
            db.close()
        name = getattr(exc, "sqlite_errorname", None)
        if name == "SQLITE_NOTADB":
            problem = f"is not an SQLite database: point {named} at the verifier's"
            problem += " database, or move this file away (it is left as it is)"
        elif name in ("SQLITE_CORRUPT", None):
            problem = f"is damaged ({exc}): restore it from a backup, or move it away to"
            problem += " start an empty one (it is left as it is)"
        else:
            problem = f"cannot be opened{'' if read_only else ' for writing'} ({exc}): it must"
            problem += f" be a file, and it and {path.parent} writable by the verifier's user"
        raise ConfigError(f"database {path} {problem}") from exc
    return db, mode


def _prepare(db: sqlite3.Connection, path: Path, *, read_only: bool, fix: str) -> None:
    """The integrity check (opening and the schema do not notice a damaged page), then the
    schema: migrated, or (read-only) checked to be a verifier's that this code can read."""
    # First: another process (a verifier's other worker) may be writing the database.
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError("; ".join(problems))
    db.row_factory = sqlite3.Row
    if read_only:
        if sqlite_schema.applied_version(db) is None:
            raise ConfigError(f"database {path} holds no verifier data: {fix}; left as it is")
        sqlite_schema.refuse_newer(db, path)
        return
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    sqlite_schema.migrate(db, path)


def _busy(exc: sqlite3.OperationalError) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return isinstance(name, str) and name.startswith("SQLITE_BUSY")


@dataclass
class _Job(Generic[T]):
    work: Callable[[sqlite3.Connection], T]
    future: concurrent.futures.Future[T]


class Writer:
    """The one thread that writes, and owns the write connection."""

    def __init__(
        self,
        db: sqlite3.Connection,
        *,
        on_commit: CommitHook | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._db = db
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` run in the writer thread, in a savepoint of the next transaction; its
        value once that transaction committed. Cancelled before the writer took it: not
        run at all."""
        return await asyncio.wrap_future(self.submit(work))

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the verifier database is closed")
            self._queue.put(_Job(work, future))
        return future

    def close(self) -> None:
        """Commit what is queued, stop the thread, close the connection. Blocks."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # after every write queued: refused from now on
        self._thread.join()
        self._db.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            batch: list[_Job[Any]] = []
            if first is None:
                stop = True
            else:
                batch.append(first)
            while not stop and len(batch) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                else:
                    batch.append(job)
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            try:
                while live:
                    live = self._transaction(live)
            except Exception as exc:  # a broken connection: every caller learns of it
                logger.exception("verifier database write failed")
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _begin(self) -> None:
        """Take the write lock. Another process writing the same database (the verifier's
        other workers) holds it for one group commit at a time; SQLite waits busy_timeout
        for it, and past that this waits again, up to BUSY_ATTEMPTS times, saying so."""
        for attempt in range(1, BUSY_ATTEMPTS + 1):
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or attempt == BUSY_ATTEMPTS:
                    raise
                logger.warning(
                    "verifier database: the write lock is held by another connection for over "
                    "%d ms (attempt %d of %d): waiting",
                    BUSY_TIMEOUT_MS,
                    attempt,
                    BUSY_ATTEMPTS,
                )
            else:
                return

    def _transaction(self, jobs: list[_Job[Any]]) -> list[_Job[Any]]:
        """Run ``jobs`` in one transaction and commit; the jobs to run again in a new one
        when a failing job ended this transaction (SQLite rolls back the whole transaction
        on some errors: disk full, I/O)."""
        db = self._db
        self._begin()
        done: list[tuple[_Job[Any], Any]] = []
        for i, job in enumerate(jobs):
            db.execute("SAVEPOINT job")
            try:
                value = job.work(db)
            except Exception as exc:  # noqa: BLE001 (the job's own error, raised to its caller)
                if not db.in_transaction:
                    job.future.set_exception(exc)
                    return [j for j, _ in done] + jobs[i + 1 :]
                db.execute("ROLLBACK TO job")
                db.execute("RELEASE job")
                job.future.set_exception(exc)
                continue
            db.execute("RELEASE job")
            done.append((job, value))
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for job, _ in done:
                job.future.set_exception(exc)
            return []
        for job, value in done:
            job.future.set_result(value)
        if self._on_commit is not None:
            try:
                self._on_commit(len(done))
            except Exception:  # an observer's bug must not stop the writer
                logger.exception("verifier database commit hook failed")
        return []


class Readers:
    """A few threads that read, each on its own connection, each read in one snapshot."""

    def __init__(self, path: Path, mode: str, *, workers: int = 4) -> None:
        self._uri = _uri(path, mode)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sqlite-read")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._read, work)

    def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._uri, uri=True, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        db.execute("BEGIN")
        try:
            return work(db)
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        """Finish the reads in flight, close every connection. Blocks."""
        self._pool.shutdown(wait=True)
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()


class SqliteEngine:
    """``sql.Engine`` over an SQLite file: writes by the ``Writer`` (group commit), reads by
    the ``Readers``; ``writer`` None: open read-only."""

    sql: Fragments = SQLITE

    def __init__(self, location: str, writer: Writer | None, readers: Readers) -> None:
        self.location = location
        self._writer = writer
        self._readers = readers

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise ValueError(f"database {self.location} is open read-only: nothing is written")
        return await self._writer.run(work)

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._readers.run(work)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._readers.close()
