"""The audit trail as ``devtrust audit`` reads and maintains it, on the verifier's database
(a file or a server's URL): every chain checked in one streaming pass (``verify``), entries
written before the chains put on them (``seal``), old entries deleted keeping the chains
verifiable (``prune``). The checks are ``audit_chain``'s, the writes ``audit_rows``'.

Reading holds one entry at a time, plus the heads and checkpoints (one of each per chain
and per thousand entries): a fleet's audit of any length verifies in bounded memory.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from devtrust.core.errors import ConfigError
from devtrust.verifier import audit_chain
from devtrust.verifier.audit_chain import Break, Broken, Entry, Mark, Stored
from devtrust.verifier.config import DatabaseUrl, database_location
from devtrust.verifier.storage import audit_rows

T = TypeVar("T")
_COLUMNS = (
    "SELECT id, at, device_id, event, tier, detail, actor, chain, chain_seq, prev_hash, hash "
)
# (every chain, one chain): the same statements with and without the chain's condition.
_ENTRIES = (
    _COLUMNS + "FROM audit WHERE chain IS NOT NULL ORDER BY chain, chain_seq",
    _COLUMNS + "FROM audit WHERE chain = ? ORDER BY chain_seq",
)
_HEADS = (
    "SELECT chain, seq, hash FROM audit_heads",
    "SELECT chain, seq, hash FROM audit_heads WHERE chain = ?",
)
_MARKS = (
    "SELECT chain, chain_seq, hash, pruned FROM audit_checkpoints",
    "SELECT chain, chain_seq, hash, pruned FROM audit_checkpoints WHERE chain = ?",
)
_UNCHAINED = (
    "SELECT id, device_id, event FROM audit WHERE chain IS NULL ORDER BY id",
    "SELECT id, device_id, event FROM audit WHERE chain IS NULL AND device_id = ? ORDER BY id",
)
_CHAIN_TABLES = ("audit_heads", "audit_checkpoints")


class Reader(Protocol):
    """A connection as ``verify`` reads it: ``?`` marks, rows by position."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Sequence[Any]]:
        """The rows of ``sql``, fetched as they are iterated (a server-side cursor)."""
        ...

    def tables(self) -> set[str]: ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Every read inside it sees one state of the database."""
        ...


class Writer(Protocol):
    def write(self, work: Callable[[audit_rows.Executes], T]) -> T:
        """``work`` in one transaction, committed when it returns."""
        ...


# --- verify --------------------------------------------------------------------------------


@dataclass
class Report:
    """What ``verify`` found: each broken chain's first broken record (the earliest first),
    and the counts and heads of what it read."""

    chains: int = 0
    entries: int = 0
    broken: list[Break] = field(default_factory=list)
    heads: dict[str, Mark] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return not self.broken


def verify(
    db: Reader, *, chain: str | None = None, recorded: Mapping[str, Mark] | None = None
) -> Report:
    """Check every chain (or only ``chain``): its entries, checkpoints and head
    (``audit_chain.check_chain``), and that no entry is off a chain; all in one snapshot
    of the database, so that a verifier writing meanwhile breaks nothing. ``recorded``:
    heads printed by an earlier verify and kept elsewhere, checked as checkpoints: a chain
    rewritten since (hashes and all) does not hold them."""
    with db.snapshot():
        return _verify(db, chain, recorded or {})


def _verify(db: Reader, chain: str | None, recorded: Mapping[str, Mark]) -> Report:
    found = db.tables()
    missing = [t for t in _CHAIN_TABLES if t not in found]
    if missing:
        raise ConfigError(
            f"the database has no {', '.join(missing)}: its schema is older than the audit "
            "chains (step 7); open it once with this devtrust's verifier, then verify"
        )
    one, params = (0, ()) if chain is None else (1, (chain,))
    heads = {str(r[0]): Mark(int(r[1]), str(r[2])) for r in db.rows(_HEADS[one], params)}
    marks: dict[str, dict[int, Mark]] = {}
    for r in db.rows(_MARKS[one], params):
        marks.setdefault(str(r[0]), {})[int(r[1])] = Mark(int(r[1]), str(r[2]), bool(r[3]))
    report = Report(heads=heads)
    for name, mark in recorded.items():
        if chain is None or name == chain:
            _record(report, marks.setdefault(name, {}), name, mark)
    seen = set()
    rows = db.rows(_ENTRIES[one], params)
    for name, group in itertools.groupby(map(_stored, rows), key=lambda s: s.entry.chain):
        seen.add(name)
        counted = _counting(group, report)
        _note(report, audit_chain.check_chain(
            name, counted, head=heads.get(name), checkpoints=marks.get(name, {})))  # fmt: skip
        for _ in counted:  # the rest of a broken chain, counted
            pass
    for name in sorted((heads.keys() | marks.keys()) - seen):
        _note(report, audit_chain.check_chain(
            name, iter(()), head=heads.get(name), checkpoints=marks.get(name, {})))  # fmt: skip
    report.chains = len(seen | heads.keys())
    _unchained(db, report, chain)
    report.broken.sort(key=lambda b: (b.id == 0, b.id, b.chain))
    return report


def _record(report: Report, marks: dict[int, Mark], chain: str, mark: Mark) -> None:
    """A recorded head among the chain's checkpoints; one the database holds another
    hash for at that seq breaks there."""
    kept = marks.get(mark.seq)
    if kept is not None and kept.hash != mark.hash:
        report.broken.append(Break(chain, mark.seq, 0, Broken.CHECKPOINT,
            f"the checkpoint at seq {mark.seq} is not the head recorded earlier"))  # fmt: skip
        return
    marks[mark.seq] = Mark(mark.seq, mark.hash, pruned=kept.pruned if kept else False,
                           recorded=True)  # fmt: skip


def _counting(entries: Iterator[Stored], report: Report) -> Iterator[Stored]:
    for row in entries:
        report.entries += 1
        yield row


def _note(report: Report, found: Break | None) -> None:
    if found is not None:
        report.broken.append(found)


def _unchained(db: Reader, report: Report, chain: str | None) -> None:
    """Entries on no chain: not written by ``append`` (nor sealed) and so unchecked."""
    one, params = (0, ()) if chain is None else (1, (_device_of(chain),))
    count, first = 0, None
    for row in db.rows(_UNCHAINED[one], params):
        if chain is None or audit_chain.chain_of(str(row[1]), str(row[2])) == chain:
            count, first = count + 1, first or row
    if first is not None:
        where = audit_chain.chain_of(str(first[1]), str(first[2]))
        report.broken.append(Break(where, 0, int(first[0]), Broken.UNCHAINED,
            f"{count} entries are on no chain (the first: event {first[2]!r}): written "
            "before the chains and not sealed (devtrust audit seal), or inserted "
            "since"))  # fmt: skip


def _device_of(chain: str) -> str:
    return "" if chain in audit_chain.NAMED_CHAINS or chain == audit_chain.LEGACY_CHAIN else chain


def _stored(row: Sequence[Any]) -> Stored:
    entry = Entry(
        chain=str(row[7]),
        seq=_number(row[8]),
        at=_at(row[1]),
        device_id=str(row[2]),
        event=str(row[3]),
        actor=str(row[6]),
        tier=str(row[4]),
        detail=str(row[5]),
    )
    return Stored(id=_number(row[0]), entry=entry, prev_hash=str(row[9]), hash=str(row[10]))


def _at(value: object) -> str:
    """The canonical time; a time edited into something that is none hashes as its text,
    so its chain breaks there rather than the command failing."""
    if not isinstance(value, (str, datetime.datetime)):
        return str(value)
    try:
        return audit_chain.canonical_at(value)
    except ValueError:
        return str(value)


def _number(value: object) -> int:
    """An id or seq; one edited into something that is no number (SQLite keeps any type
    in any column) reads as -1, which breaks its chain's order there."""
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return -1


# --- opening the database ------------------------------------------------------------------


@contextmanager
def opened(database: str, *, write: bool) -> Iterator[Any]:
    """The database ``database`` names, as a Reader (``write`` False: never written, nor
    migrated) or a Writer (migrated first, as the verifier does when it opens it)."""
    try:
        location = database_location(database)
    except ValueError as exc:
        raise ConfigError(f"--database {exc}") from None
    if isinstance(location, Path):
        with _sqlite(location, write=write) as db:
            yield db
    else:
        with _postgresql(location, write=write) as db:
            yield db


@contextmanager
def _sqlite(path: Path, *, write: bool) -> Iterator[Any]:
    from devtrust.verifier.storage.sqlite_engine import open_database  # noqa: PLC0415

    connection, _ = open_database(path, create=False, read_only=not write)
    with closing(connection):
        yield _SqliteDb(connection)


class _SqliteDb:
    def __init__(self, db: Any) -> None:
        self._db = db

    def rows(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Sequence[Any]]:
        yield from self._db.execute(sql, tuple(params))

    def tables(self) -> set[str]:
        found = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(r[0]) for r in found}

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        # One read transaction: what a running verifier commits meanwhile is not seen, so a
        # head read first matches the entries read after it.
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("ROLLBACK")

    def write(self, work: Callable[[audit_rows.Executes], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result


@contextmanager
def _postgresql(url: DatabaseUrl, *, write: bool) -> Iterator[Any]:
    import asyncio  # noqa: PLC0415

    from devtrust.verifier.storage import backends, postgresql  # noqa: PLC0415

    async def check() -> None:
        # Opened as the verifier opens it: refused when it holds no verifier data or a newer
        # schema; migrated when this command writes.
        repos = await backends.open_repositories(
            str.__str__(url), create=False, read_only=not write
        )
        await repos.close()

    asyncio.run(check())
    info, _ = postgresql.conninfo(url)
    conn = postgresql.connect(info, url.redacted, named="--database")
    with closing(conn):
        yield _PgDb(conn, write=write)


class _PgDb:
    """A psycopg connection: reads in one read-only REPEATABLE READ snapshot through a
    server-side cursor (rows arrive as they are iterated); writes SERIALIZABLE, run again
    when they lose a conflict with a verifier writing meanwhile."""

    TRIES = 5

    def __init__(self, conn: Any, *, write: bool) -> None:
        import psycopg  # noqa: PLC0415

        self._conn = conn
        self._psycopg = psycopg
        self._cursors = itertools.count()
        conn.isolation_level = (
            psycopg.IsolationLevel.SERIALIZABLE if write else psycopg.IsolationLevel.REPEATABLE_READ
        )
        conn.read_only = not write

    def rows(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Sequence[Any]]:
        from devtrust.verifier.storage.pg_engine import marks  # noqa: PLC0415

        with self._conn.cursor(name=f"audit_{next(self._cursors)}") as cur:
            cur.itersize = 1000
            cur.execute(marks(sql), tuple(params))
            yield from cur

    def tables(self) -> set[str]:
        found = self._conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        return {str(r[0]) for r in found}

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._conn.rollback()

    def write(self, work: Callable[[audit_rows.Executes], T]) -> T:
        from devtrust.verifier.storage.pg_engine import PgConnection  # noqa: PLC0415

        for attempt in range(self.TRIES):
            try:
                result = work(PgConnection(self._conn))
                self._conn.commit()
            except self._psycopg.errors.SerializationFailure:
                self._conn.rollback()
                if attempt == self.TRIES - 1:
                    raise
            except BaseException:
                self._conn.rollback()
                raise
            else:
                return result
        raise AssertionError("unreachable")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
