"""The audit trail as ``devtrust audit`` reads and maintains it, on the verifier's database
(a file or a server's URL): every chain checked in one streaming pass (``verify``), entries
written before the chains put on them (``seal``), old entries deleted keeping the chains
verifiable (``prune``). The checks are ``audit_chain``'s, the writes ``audit_rows``'.

Reading holds one entry at a time, plus the heads, checkpoints and announcements (one of
each per chain, and a checkpoint per thousand entries): a fleet's audit of any length
verifies in bounded memory. Beyond each chain's own checks: every announced chain is there,
every chain there was announced, every pruning checkpoint is one an audit_pruned entry
names, and no entry is off a chain.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
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
    "SELECT id, device_id, event, detail FROM audit WHERE chain IS NULL ORDER BY id",
    "SELECT id, device_id, event, detail FROM audit WHERE chain IS NULL AND device_id = ? "
    "ORDER BY id",
)
# What the chains ``audit`` and ``chains`` vouch for: each pruning checkpoint, each chain.
_PRUNED = "SELECT detail FROM audit WHERE chain = 'audit' AND event = 'audit_pruned'"
# The announcing chains: the root "chains" and its shards "chains/0".."chains/f".
_STARTED = (
    "SELECT chain, chain_seq, detail FROM audit WHERE event = 'chain_started' "
    "AND (chain = 'chains' OR chain LIKE 'chains/_')"
)
_LEGACY = "SELECT MAX(last_id) FROM audit_legacy"
_CHAIN_TABLES = ("audit_heads", "audit_checkpoints", "audit_legacy")


class Reader(Protocol):
    """A connection as ``verify`` reads it: ``?`` marks, rows by position."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Sequence[Any]]:
        """The rows of ``sql``, fetched as they are iterated (a server-side cursor)."""
        ...

    def tables(self) -> set[str]: ...

    def executes(self) -> audit_rows.Executes:
        """The connection as ``audit_rows`` reads it (inside ``snapshot``)."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Every read inside it sees one state of the database, in a read-only transaction
        (on PostgreSQL REPEATABLE READ: it takes no lock a verifier's append waits on or
        conflicts with, however long the read)."""
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
    """Check every chain (or only ``chain``; ConfigError for one the audit does not hold):
    its entries, checkpoints and head (``audit_chain.check_chain``), its announcement and
    pruning records, and that no entry is off a chain; all in one snapshot
    of the database, so that a verifier writing meanwhile breaks nothing. ``recorded``:
    heads printed by an earlier verify and kept elsewhere, checked as checkpoints: a chain
    rewritten since (hashes and all) does not hold them."""
    with db.snapshot():
        return _verify(db, chain, recorded or {})


def verify_in_snapshot(db: Reader) -> Report:
    """``verify`` of every chain inside a snapshot the caller holds, so that its figures
    and the chains' status describe one state (``devtrust report``)."""
    return _verify(db, None, {})


def _verify(db: Reader, chain: str | None, recorded: Mapping[str, Mark]) -> Report:
    found = db.tables()
    missing = [t for t in _CHAIN_TABLES if t not in found]
    if missing:
        raise ConfigError(
            f"the database has no {', '.join(missing)}: its schema is older than the audit "
            "chains (step 7); open it once with this devtrust's verifier, then verify"
        )
    one, params = (0, ()) if chain is None else (1, (chain,))
    heads = {str(r[0]): Mark(_number(r[1]), str(r[2])) for r in db.rows(_HEADS[one], params)}
    marks: dict[str, dict[int, Mark]] = {}
    for r in db.rows(_MARKS[one], params):
        seq = _number(r[1])
        marks.setdefault(str(r[0]), {})[seq] = Mark(seq, str(r[2]), bool(r[3]))
    _vouch(db, marks)
    started = _started(db, chain)
    known = heads.keys() | marks.keys() | started.keys()
    report = Report(heads=heads)
    for name, mark in recorded.items():
        if chain is None or name == chain:
            _record(report, marks.setdefault(name, {}), name, mark)

    def check(name: str, entries: Iterator[Stored]) -> None:
        points = marks.get(name, {})
        if name in started:  # the announced first hash: a checkpoint at seq 1
            points = {1: Mark(1, started[name].first, announced=True)} | points
        _note(report, audit_chain.check_chain(
            name, entries, head=heads.get(name), checkpoints=points))  # fmt: skip

    seen = set()
    rows = db.rows(_ENTRIES[one], params)
    for name, group in itertools.groupby(map(_stored, rows), key=lambda s: s.entry.chain):
        seen.add(name)
        counted = _counting(group, report)
        check(name, counted)
        for _ in counted:  # the rest of a broken chain, counted
            pass
    for name in sorted((heads.keys() | marks.keys()) - seen):
        check(name, iter(()))
    if chain is not None and chain not in known | seen:
        raise ConfigError(f"--chain {chain}: the audit has no such chain")
    report.chains = len(seen | heads.keys())
    _announced(report, seen | heads.keys(), started, whole=chain is None)
    _unchained(db, report, chain)
    report.broken.sort(key=lambda b: (b.id == 0, b.id, b.chain))
    return report


def _vouch(db: Reader, marks: dict[str, dict[int, Mark]]) -> None:
    """Mark each pruning checkpoint that an audit_pruned entry names (chain, seq, hash) as
    vouched for: only those account for a chain's missing first entries. The entries are
    read as stored; the chain ``audit`` itself is checked with the others."""
    for (text,) in db.rows(_PRUNED):
        for item in json_object(text).get("pruned", ()):
            if not (isinstance(item, list) and len(item) == 3):
                continue
            name, seq, digest = item
            mark = marks.get(str(name), {}).get(seq) if isinstance(seq, int) else None
            if mark is not None and mark.pruned and mark.hash == digest:
                marks[str(name)][seq] = dataclasses.replace(mark, vouched=True)


@dataclass(frozen=True)
class _Started:
    """A chain's announcement: the announcing chain and seq, and the chain's first hash."""

    on: str
    seq: int
    first: str


def _started(db: Reader, chain: str | None) -> dict[str, _Started]:
    """Every chain announced on the chain that announces it (``audit_chain.announced_on``;
    one on another announcing chain counts for nothing, and breaks the chain it is on), or
    only ``chain``'s: where, and the chain's first hash."""
    found: dict[str, _Started] = {}
    for on, seq, text in db.rows(_STARTED):
        name, first = audit_chain.announced(str(text)), json_object(text).get("first")
        if name is None or not isinstance(first, str) or chain not in (None, name):
            continue
        if str(on) == audit_chain.announced_on(name):
            found.setdefault(name, _Started(str(on), _number(seq), first))
    return found


def _announced(
    report: Report, chains: set[str], started: Mapping[str, _Started], *, whole: bool
) -> None:
    """Every announced chain is there (retention never deletes a chain's last entry), and
    (reading them all) every chain there but the root ``chains`` was announced where
    ``audit_chain.announced_on`` says."""
    for name in sorted(started.keys() - chains):
        where = started[name]
        report.broken.append(Break(name, 1, 0, Broken.MISSING,
            f"the whole chain is gone (entries and head): chain_started at seq {where.seq} "
            f"of the chain {where.on} announced it"))  # fmt: skip
    if whole:
        for name in sorted(chains - started.keys() - {audit_chain.CHAINS}):
            report.broken.append(Break(name, 0, 0, Broken.UNANNOUNCED,
                f"no chain_started entry on the chain {audit_chain.announced_on(name)} "
                "announces it: it was not started by the verifier"))  # fmt: skip


def json_object(text: object) -> dict[str, Any]:
    """A stored JSON detail as an object; {} for text that is not one (a tampered row)."""
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _record(report: Report, marks: dict[int, Mark], chain: str, mark: Mark) -> None:
    """A recorded head among the chain's checkpoints; one the database holds another
    hash for at that seq breaks there."""
    kept = marks.get(mark.seq)
    if kept is not None and kept.hash != mark.hash:
        report.broken.append(Break(chain, mark.seq, 0, Broken.CHECKPOINT,
            f"the checkpoint at seq {mark.seq} is not the head recorded earlier"))  # fmt: skip
        return
    marks[mark.seq] = dataclasses.replace(kept or mark, recorded=True)


def _counting(entries: Iterator[Stored], report: Report) -> Iterator[Stored]:
    for row in entries:
        report.entries += 1
        yield row


def _note(report: Report, found: Break | None) -> None:
    if found is not None:
        report.broken.append(found)


def _unchained(db: Reader, report: Report, chain: str | None) -> None:
    """Entries on no chain: not written by ``append`` (nor sealed) and so unchecked. Those
    written before the chains (ids up to the one step 7 recorded) wait for ``devtrust audit
    seal``; any later one was inserted around the verifier (append chains every entry)."""
    one, params = (0, ()) if chain is None else (1, (audit_chain.device_of(chain),))
    [(bound,)] = list(db.rows(_LEGACY))
    last = _number(bound) if bound is not None else 0
    count, first, stray = 0, None, None
    for row in db.rows(_UNCHAINED[one], params):
        if chain is None or audit_chain.chain_of(str(row[1]), str(row[2]), str(row[3])) == chain:
            count, first = count + 1, first or row
            if stray is None and _number(row[0]) > last:
                stray = row
    if first is None:
        return
    shown = stray or first
    where = audit_chain.chain_of(str(shown[1]), str(shown[2]), str(shown[3]))
    why = (
        f"inserted after the chains began (id above {last}, the last entry from before "
        "them): not written by the verifier"
        if stray is not None
        else "written before the chains and not sealed (devtrust audit seal)"
    )
    report.broken.append(Break(where, 0, _number(shown[0]), Broken.UNCHAINED,
        f"{count} entries are on no chain (the first: event {shown[2]!r}): {why}"))  # fmt: skip


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


def plan_prune(db: Reader, *, before: datetime.datetime) -> tuple[Report, list[audit_rows.Pruning]]:
    """Retention's checks, in one read-only snapshot: the whole audit verified, and (when
    intact) what each prunable chain loses at ``before``."""
    with db.snapshot():
        report = _verify(db, None, {})
        if not report.intact:
            return report, []
        c = db.executes()
        plan = [audit_rows.plan_prune(c, name, before=before) for name in audit_rows.chains(c)]
    return report, [p for p in plan if p is not None]


def driver_errors() -> tuple[type[Exception], ...]:
    """The errors of the database drivers (a file that is no database or is corrupt, a
    server gone or refusing a read): reported in one line, never a traceback."""
    import sqlite3  # noqa: PLC0415

    import psycopg  # noqa: PLC0415

    return (sqlite3.Error, psycopg.Error)


def unreadable(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"the audit could not be read: {first}"


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

    def executes(self) -> audit_rows.Executes:
        return self._db  # type: ignore[no-any-return]

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
        yield _PgDb(conn, write=write, where=url.redacted)


class _PgDb:
    """A psycopg connection: reads in one read-only REPEATABLE READ snapshot through a
    server-side cursor (rows arrive as they are iterated); writes SERIALIZABLE, run again
    when they lose a conflict with a verifier writing meanwhile."""

    def __init__(self, conn: Any, *, write: bool, where: str) -> None:
        import psycopg  # noqa: PLC0415

        self._conn = conn
        self._where = where
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

    def executes(self) -> audit_rows.Executes:
        from devtrust.verifier.storage.pg_engine import PgConnection  # noqa: PLC0415

        return PgConnection(self._conn)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        # Read-only REPEATABLE READ even on a connection opened to write: a SERIALIZABLE
        # read-write transaction reading the whole audit would take SIREAD locks (promoted
        # to relation locks) that fail the verifiers' appends meanwhile.
        conn = self._conn
        conn.rollback()
        saved = conn.isolation_level, conn.read_only
        conn.isolation_level = self._psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        try:
            yield
        finally:
            conn.rollback()
            conn.isolation_level, conn.read_only = saved

    def write(self, work: Callable[[audit_rows.Executes], T]) -> T:
        """``work`` in one transaction, with the store's rules (storage/pg_engine.write_on):
        run again after losing a conflict with a verifier writing meanwhile."""
        from devtrust.verifier.storage.pg_engine import write_on  # noqa: PLC0415

        return write_on(self._conn, work, where=self._where)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
