"""PostgreSQL off the event loop: a bounded psycopg connection pool used from a thread
executor, with the SQLite engine's surface (``sql.Engine``: async ``write(work)`` and
``read(work)``), so one repository code serves both.

Writes. Each write is one transaction at SERIALIZABLE isolation: whatever several replicas
run at once, the outcome is that of some order one after the other, which is what the
repositories' check-then-change code assumes (on SQLite one writer gives it): a token spent
once, one enrollment, a lease checked and the trust row written as one step, no lost update,
without locks placed by hand. A transaction PostgreSQL aborts for a serialization failure
or a deadlock is run again (bounded, with jittered waits): it committed nothing. A
connection lost before COMMIT (a server restart) is run again on a fresh connection, within
RECONNECT_S; a connection lost DURING the commit leaves its outcome unknown, and that raises
(StoreUnavailable): the caller got no acknowledgement and never reports success.

Reads run in REPEATABLE READ READ ONLY transactions (one snapshot, like SQLite's reads), run
again on a fresh connection when theirs was lost. The pool reconnects by itself: a verifier
rides out a PostgreSQL restart without a restart of its own.

The adapter (``PgConnection``) rewrites the repositories' ``?`` marks to psycopg's ``%s``
once per statement text (cached; a literal ``%`` is escaped) and gives rows read by
position and by column name, as sqlite3.Row does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import RowMaker
from psycopg_pool import ConnectionPool, PoolTimeout

from devtrust.verifier.storage.sql import POSTGRESQL, Fragments, StoreUnavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Serialization failures and deadlocks: a write is run this many times at most.
MAX_ATTEMPTS = 12
# How long a write or read waits, in all, for the server to come back (a restart).
RECONNECT_S = 15.0
# Connections a process holds at most (the URL's pool_size overrides it).
POOL_SIZE = 10
# Every write's isolation: what makes the repositories' check-then-change code safe across
# replicas (tests/test_pg_concurrency.py shows each race lost at READ COMMITTED).
WRITE_ISOLATION = IsolationLevel.SERIALIZABLE
# The errors after which a transaction is run again: it committed nothing.
_RETRIED = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


class PgRow:
    """One row: columns by position and by name; iterates and unpacks like a tuple."""

    __slots__ = ("_names", "_values")

    def __init__(self, values: Sequence[Any], names: dict[str, int]) -> None:
        self._values = values
        self._names = names

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._names[key]]
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)


def pg_rows(cursor: psycopg.Cursor[Any]) -> RowMaker[PgRow]:
    """psycopg's row factory of ``PgRow``."""
    names = {column.name: i for i, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(values, names)

    return make


@functools.lru_cache(maxsize=4096)
def marks(sql: str) -> str:
    """``sql`` with its ``?`` marks as ``%s`` and its ``%`` as ``%%``, outside quoted
    literals and identifiers."""
    out: list[str] = []
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
            out.append("%%" if char == "%" else char)
        elif char in "'\"":
            quote = char
            out.append(char)
        elif char == "?":
            out.append("%s")
        elif char == "%":
            out.append("%%")
        else:
            out.append(char)
    return "".join(out)


class PgConnection:
    """``sql.Connection`` over a psycopg connection in an open transaction."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[PgRow]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[PgRow]:
        return self._conn.execute(marks(sql), tuple(parameters))

    def executemany(
        self, sql: str, parameters: Iterable[Sequence[Any]], /
    ) -> psycopg.Cursor[PgRow]:
        cur = self._conn.cursor()
        cur.executemany(marks(sql), [tuple(p) for p in parameters])
        return cur


def _lost(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.closed or conn.broken)


class PgEngine:
    """``sql.Engine`` over a PostgreSQL database; ``read_only``: writes refused."""

    sql: Fragments = POSTGRESQL

    def __init__(
        self, location: str, pool: ConnectionPool[psycopg.Connection[PgRow]], *, read_only: bool
    ) -> None:
        self.location = location
        self._pool = pool
        self._read_only = read_only
        self._threads = ThreadPoolExecutor(max_workers=pool.max_size, thread_name_prefix="pg-store")
        self._closed = threading.Event()
        # Transactions run again after a serialization failure or deadlock (metrics, tests).
        self.conflicts = 0

    async def write(self, work: Callable[[PgConnection], T]) -> T:
        if self._read_only:
            raise ValueError(f"database {self.location} is open read-only: nothing is written")
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.run_write, work)

    async def read(self, work: Callable[[PgConnection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.run_read, work)

    def close(self) -> None:
        """Finish the work in flight, close every connection. Blocks."""
        self._closed.set()
        self._threads.shutdown(wait=True)
        self._pool.close()

    # --- in the executor's threads ---------------------------------------------------------

    def _connection(self, deadline: float) -> psycopg.Connection[PgRow]:
        try:
            return self._pool.getconn(timeout=max(0.1, deadline - time.monotonic()))
        except PoolTimeout as exc:
            raise StoreUnavailable(
                f"database {self.location}: no connection to PostgreSQL within "
                f"{RECONNECT_S:.0f} s ({exc}): is the server running?"
            ) from None

    def _wait_for_server(self, deadline: float, exc: Exception) -> None:
        """After a lost connection: drop the pool's other dead ones, wait a moment; raise
        StoreUnavailable once the deadline passed."""
        if time.monotonic() >= deadline or self._closed.is_set():
            raise StoreUnavailable(
                f"database {self.location}: the connection to PostgreSQL was lost and not "
                f"regained within {RECONNECT_S:.0f} s ({_one_line(exc)})"
            ) from exc
        logger.warning("database %s: connection lost (%s): retrying", self.location, exc)
        self._pool.check()
        time.sleep(random.uniform(0.05, 0.3))  # noqa: S311 (jitter, not a secret)

    def run_write(self, work: Callable[[PgConnection], T]) -> T:
        """``work`` in one SERIALIZABLE transaction, committed; run again as the module
        says."""
        deadline = time.monotonic() + RECONNECT_S
        attempt = 0
        while True:
            attempt += 1
            conn = self._connection(deadline)
            committing = False
            try:
                conn.isolation_level = WRITE_ISOLATION
                conn.read_only = False
                value = work(PgConnection(conn))
                committing = True
                conn.commit()
            except _RETRIED as exc:
                _rollback(conn)
                self.conflicts += 1
                if attempt >= MAX_ATTEMPTS:
                    raise StoreUnavailable(
                        f"database {self.location}: a write lost {attempt} serialization "
                        f"conflicts in a row ({_one_line(exc)}): try again"
                    ) from exc
                time.sleep(random.uniform(0, min(0.002 * 2**attempt, 0.2)))  # noqa: S311
            except psycopg.OperationalError as exc:
                if not _lost(conn):
                    _rollback(conn)
                    raise
                if committing:
                    raise StoreUnavailable(
                        f"database {self.location}: the connection broke during COMMIT "
                        f"({_one_line(exc)}): whether this write was stored is unknown"
                    ) from exc
                self._wait_for_server(deadline, exc)
            except BaseException:
                _rollback(conn)
                raise
            else:
                return value
            finally:
                self._pool.putconn(conn)

    def run_read(self, work: Callable[[PgConnection], T]) -> T:
        """``work`` in one REPEATABLE READ READ ONLY transaction; run again on a fresh
        connection when this one was lost (a read changes nothing)."""
        deadline = time.monotonic() + RECONNECT_S
        while True:
            conn = self._connection(deadline)
            try:
                conn.isolation_level = IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                value = work(PgConnection(conn))
                conn.rollback()
            except psycopg.OperationalError as exc:
                if not _lost(conn):
                    _rollback(conn)
                    raise
                self._wait_for_server(deadline, exc)
            except BaseException:
                _rollback(conn)
                raise
            else:
                return value
            finally:
                self._pool.putconn(conn)


def _rollback(conn: psycopg.Connection[Any]) -> None:
    if not _lost(conn):
        try:
            conn.rollback()
        except psycopg.Error:
            logger.debug("rollback failed", exc_info=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
