"""What the repositories' SQL runs on, whichever database is behind it: a connection
(``Connection``: ``execute`` with ``?`` marks, a cursor with ``fetchone``/``fetchall``/
``rowcount``, rows read by position and by column name, as ``sqlite3`` gives them), the
engine that runs work on one (``Engine``: ``write`` in a transaction of its own, ``read`` in
a snapshot), and the few fragments of SQL the dialects write differently (``Fragments``).

One repository code (``repositories``, ``admin``, ``enroll``, ``revocations``, ``changes``,
``policies``) thus serves SQLite (``sqlite_engine``: sqlite3 connections as they are) and
PostgreSQL (``pg_engine``: psycopg connections behind an adapter that rewrites the marks).
A work function may run more than once (PostgreSQL retries a transaction that lost a
serialization conflict): it changes nothing but the database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from devtrust.core.errors import DevtrustError

T = TypeVar("T")


class Row(Protocol):
    """One row: its columns by position and by name."""

    def __getitem__(self, key: int | str, /) -> Any: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """A connection inside the transaction its engine opened (sqlite3.Connection has it).
    SQL is written with ``?`` marks."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


Work = Callable[[Connection], T]


@dataclass(frozen=True)
class Fragments:
    """The SQL a dialect writes its own way; everything else is written once."""

    name: str
    # The device ``d`` carries the label (key, value): two marks, the key then the value.
    label_match: str


SQLITE = Fragments(
    name="sqlite",
    label_match="EXISTS (SELECT 1 FROM json_each(d.labels) AS l WHERE l.key = ? AND l.value = ?)",
)
POSTGRESQL = Fragments(
    name="postgresql",
    # labels is JSON text (one codec for both backends), read as jsonb here.
    label_match="(d.labels::jsonb ->> (?::text)) = ?",
)


class Engine(Protocol):
    """Runs the repositories' work: ``write`` in a transaction of its own (SQLite: a
    savepoint of a group commit), durable when it returns; ``read`` in one snapshot."""

    @property
    def location(self) -> str: ...

    @property
    def sql(self) -> Fragments: ...

    async def write(self, work: Callable[[Connection], T]) -> T: ...

    async def read(self, work: Callable[[Connection], T]) -> T: ...

    def close(self) -> None:
        """Let the writes in flight finish, release the database. Blocks."""
        ...


class StoreUnavailable(DevtrustError):
    """The database cannot be reached now (a server restarting), or a commit's outcome is
    unknown (the connection broke while committing): the caller got no acknowledgement and
    must not report success; it may try again later."""


class StoreBusy(StoreUnavailable):
    """A write lost every one of its runs to concurrent writes (PostgreSQL's serialization
    conflicts): nothing was committed and the database answers, so this is contention, not
    an outage. Callers are told UNAVAILABLE as for an outage (they try again), but health
    stays SERVING (``store_health.StoreHealth.failed``): moving to another replica would not
    help, the database is the same."""
