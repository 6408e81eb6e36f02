"""PostgreSQL off the event loop: a bounded psycopg connection pool used from a thread
executor, with the SQLite engine's surface (``sql.Engine``: async ``write(work)`` and
``read(work)``), so one repository code serves both.

Writes. Each write is one transaction at SERIALIZABLE isolation: whatever several replicas
run at once, the outcome is that of some order one after the other, which is what the
repositories' check-then-change code assumes (on SQLite one writer gives it): a token spent
once, one enrollment, a lease checked and the trust row written as one step, no lost update,
without locks placed by hand. A transaction PostgreSQL aborts for a serialization failure
or a deadlock is run again (bounded, with jittered waits): it committed nothing; one that
loses every run raises StoreBusy (contention, not an outage: health stays SERVING). A
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
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import RowMaker
from psycopg_pool import ConnectionPool, PoolTimeout

from devtrust.verifier.storage.sql import POSTGRESQL, Fragments, StoreBusy, StoreUnavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Serialization failures and deadlocks: a write is run this many times at most, with a
# jittered wait before each new run of up to 2 ms * 2**run, at most CONFLICT_WAIT_S: in all
# at most about 8.5 s (half that on average), well within server.call_timeout_s (30 s).
# A fleet enrolling at once on an empty database conflicts a lot (PostgreSQL's predicate
# locks cover index pages: on small tables every new row shares one), so the bound is set
# for bursts (40 first enrollments at once through two replicas took up to 8 runs with 12
# allowed: tests/test_audit_rows.py); past it a write raises StoreBusy.
MAX_ATTEMPTS = 24
CONFLICT_WAIT_S = 0.5
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


def secrets_of(*urls: str) -> tuple[str, ...]:
    """The passwords ``urls`` carry (in the user part or a password= parameter), as written
    and decoded, longest first: libpq's parse errors quote the token they failed on, and that
    may be the password (review M7)."""
    found: set[str] = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            found |= {parts.password, urllib.parse.unquote(parts.password)}
        for piece in parts.query.split("&"):
            key, _, value = piece.partition("=")
            if key == "password" and value:
                found |= {value, urllib.parse.unquote_plus(value)}
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


# A password stands whole in a conninfo or URL: after "password=", a quote or the user's ":",
# and before a space, a quote, "&" or "@" (or at either end of the text).
_OPENS_WHOLE = r"(?<![^\s'\"=:/@&?,(])"
_CLOSES_WHOLE = r"(?![^\s'\"@&;,)])"


def hide(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` written as *** where it stands whole (as a
    conninfo's or URL's password does), never inside a word: a one-letter password must
    neither mangle the message nor show its letters around the stars (review L11)."""
    for secret in secrets:
        text = re.sub(_OPENS_WHOLE + re.escape(secret) + _CLOSES_WHOLE, "***", text)
    return text


class Redacting(logging.Filter):
    """Takes ``secrets`` out of the records of the logger it is added to (psycopg_pool's
    reconnect warnings quote libpq's errors)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self._secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = hide(message, self._secrets)
        if hidden != message:
            record.msg, record.args = hidden, ()
        if record.exc_info and record.exc_info[1] is not None:
            shown = hide(str(record.exc_info[1]), self._secrets)
            if shown != str(record.exc_info[1]):
                record.exc_info = None
                record.exc_text = None
                record.msg = f"{record.msg} ({shown})"
        return True


class _Conflict(Exception):
    """A serialization failure or deadlock: nothing was committed; run it again."""


class _LostBeforeCommit(Exception):
    """The connection broke before COMMIT: nothing was committed."""


def _attempt(conn: psycopg.Connection[PgRow], work: Callable[[PgConnection], T], where: str) -> T:
    """``work`` once, in one SERIALIZABLE transaction on ``conn``, committed. _Conflict or
    _LostBeforeCommit (wrapping the driver's error) when it may run again; StoreUnavailable
    when the connection broke during COMMIT (its outcome unknown, never run again)."""
    committing = False
    try:
        conn.isolation_level = WRITE_ISOLATION
        conn.read_only = False
        value = work(PgConnection(conn))
        committing = True
        conn.commit()
    except _RETRIED as exc:
        _rollback(conn)
        raise _Conflict(exc) from exc
    except psycopg.OperationalError as exc:
        if not _lost(conn):
            _rollback(conn)
            raise
        if committing:
            raise StoreUnavailable(
                f"database {where}: the connection broke during COMMIT "
                f"({_one_line(exc)}): whether this write was stored is unknown"
            ) from exc
        raise _LostBeforeCommit(exc) from exc
    except BaseException:
        _rollback(conn)
        raise
    return value


def _conflicts(attempt: int, exc: BaseException, where: str) -> None:
    """After a lost conflict: StoreBusy past MAX_ATTEMPTS (the database answers: contention,
    not an outage), else a jittered wait."""
    if attempt >= MAX_ATTEMPTS:
        raise StoreBusy(
            f"database {where}: a write lost {attempt} serialization conflicts in a row "
            f"({_one_line(exc)}): try again"
        ) from exc
    time.sleep(random.uniform(0, min(0.002 * 2**attempt, CONFLICT_WAIT_S)))  # noqa: S311


def write_on(
    conn: psycopg.Connection[PgRow], work: Callable[[PgConnection], T], *, where: str
) -> T:
    """``work`` in one SERIALIZABLE transaction on this one connection (a command's own,
    outside any pool), with ``PgEngine.run_write``'s rules: run again after a serialization
    failure or deadlock; StoreUnavailable when the connection is lost (it cannot be
    regained here) or the outcome of the COMMIT is unknown."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return _attempt(conn, work, where)
        except _Conflict as exc:
            _conflicts(attempt, exc.__cause__ or exc, where)
        except _LostBeforeCommit as exc:
            raise StoreUnavailable(
                f"database {where}: the connection to PostgreSQL was lost "
                f"({_one_line(exc.__cause__ or exc)}): nothing was written; try again"
            ) from exc.__cause__


class PgEngine:
    """``sql.Engine`` over a PostgreSQL database; ``read_only``: writes refused."""

    sql: Fragments = POSTGRESQL

    def __init__(
        self,
        location: str,
        pool: ConnectionPool[psycopg.Connection[PgRow]],
        *,
        read_only: bool,
        secrets: Sequence[str] = (),
    ) -> None:
        self.location = location
        # The URL's password (``secrets_of``): kept out of every message and log line,
        # psycopg_pool's included.
        self.secrets = tuple(secrets)
        self._redacting = Redacting(self.secrets)
        logging.getLogger("psycopg.pool").addFilter(self._redacting)
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
        logging.getLogger("psycopg.pool").removeFilter(self._redacting)

    # --- in the executor's threads ---------------------------------------------------------

    def _connection(self, deadline: float) -> psycopg.Connection[PgRow]:
        try:
            return self._pool.getconn(timeout=max(0.1, deadline - time.monotonic()))
        except PoolTimeout as exc:
            raise StoreUnavailable(
                f"database {self.location}: no connection to PostgreSQL within "
                f"{RECONNECT_S:.0f} s ({hide(_one_line(exc), self.secrets)}): is the server "
                "running?"
            ) from None

    def _wait_for_server(self, deadline: float, exc: BaseException) -> None:
        """After a lost connection: drop the pool's other dead ones, wait a moment; raise
        StoreUnavailable once the deadline passed."""
        detail = hide(_one_line(exc), self.secrets)
        if time.monotonic() >= deadline or self._closed.is_set():
            raise StoreUnavailable(
                f"database {self.location}: the connection to PostgreSQL was lost and not "
                f"regained within {RECONNECT_S:.0f} s ({detail})"
            ) from exc
        logger.warning("database %s: connection lost (%s): retrying", self.location, detail)
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
            try:
                return _attempt(conn, work, self.location)
            except _Conflict as exc:
                self.conflicts += 1
                _conflicts(attempt, exc.__cause__ or exc, self.location)
            except _LostBeforeCommit as exc:
                self._wait_for_server(deadline, exc.__cause__ or exc)
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
