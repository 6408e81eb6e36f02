"""Numbered schema migrations, applied in order when a database opens: the part every
backend shares. A backend adds its dialect (``Dialect``: how to run a script, how to read
the tables and the applied steps, its transaction and lock) and its folder of scripts.

``migrations/<dialect>/NNNN_name.sql`` are the steps (``migrations/README.md``): one
numbering for every dialect, step N meaning the same schema change in each, so a database
at version N holds the same data whichever backend it is on. 0001 is the schema of
devtrust before migrations (its ``meta`` table says schema_version 1).

Each step runs in its own transaction with its row in ``schema_migrations`` (and ``meta``'s
schema_version), so a failed step leaves the database at the step before. A database made
before migrations has ``meta`` but no ``schema_migrations``: 0001 is run on it again (it is
idempotent DDL), then the dialect completes what older releases left out, and it is
recorded. A database whose steps go past the ones this code knows is refused: its schema may
mean things this code would get wrong.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from devtrust import __version__
from devtrust.core.errors import ConfigError

_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
MIGRATIONS = "migrations"
# The bookkeeping, in SQL both SQLite and PostgreSQL run; ? is the dialect's mark.
_APPLIED = "SELECT 1 FROM schema_migrations WHERE version = ?"
_RECORD = "INSERT INTO schema_migrations (version, name) VALUES (?, ?)"
_VERSION = (
    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


class Dialect(Protocol):
    """One open connection of a backend, as the migration runner drives it (synchronously:
    backends run it off the event loop, once, at open)."""

    @property
    def name(self) -> str:
        """Its folder under ``migrations/``."""
        ...

    @property
    def mark(self) -> str:
        """The driver's parameter mark (``?``, ``%s``)."""
        ...

    @property
    def bookkeeping(self) -> str:
        """``CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,
        name TEXT NOT NULL, applied_at ...)`` in the dialect's SQL."""
        ...

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """What the driver raises when a step's statement fails."""
        ...

    def tables(self) -> set[str]:
        """The names of the tables of the verifier's schema."""
        ...

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement; its rows (none for a statement that returns none)."""
        ...

    def run_script(self, step: Migration) -> None:
        """Every statement of the step's script, inside the open transaction (never
        committing it)."""
        ...

    def begin(self) -> None:
        """Open a transaction that holds other migrators (other processes) off until it
        ends."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """End the open transaction, if one is open, writing nothing."""
        ...

    def complete_legacy(self) -> None:
        """What the code before migrations added to older databases when it opened them
        (run with step 0001 on such a database; nothing on backends that came later)."""
        ...


def dialects() -> tuple[str, ...]:
    """The dialects this code ships steps for (the folders under ``migrations/``)."""
    folder = importlib.resources.files(__package__) / MIGRATIONS
    return tuple(sorted(e.name for e in folder.iterdir() if e.is_dir() and _scripts(e.name)))


def _scripts(dialect: str) -> list[str]:
    folder = importlib.resources.files(__package__) / MIGRATIONS / dialect
    return [e.name for e in folder.iterdir() if e.name.endswith(".sql")]


@cache
def migrations(dialect: str) -> tuple[Migration, ...]:
    """The steps shipped for ``dialect``, numbered 1, 2, ... without gaps; a script whose
    name is not NNNN_name.sql is an error, not a step silently skipped."""
    folder = importlib.resources.files(__package__) / MIGRATIONS / dialect
    found = []
    for name in _scripts(dialect):
        match = _NAME.fullmatch(name)
        if not match:
            raise RuntimeError(f"schema migration {dialect}/{name}: not named NNNN_name.sql")
        text = (folder / name).read_text(encoding="utf-8")
        found.append(Migration(int(match[1]), match[2], text))
    found.sort(key=lambda m: m.version)
    if not found or [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(
            f"schema migrations of {dialect} not numbered 1..n: {[m.version for m in found]}"
        )
    return tuple(found)


def latest_version(dialect: str) -> int:
    return len(migrations(dialect))


def applied_version(db: Dialect) -> int | None:
    """The last step applied; 1 for a database made before migrations; None for one that
    holds no verifier data."""
    tables = db.tables()
    if "schema_migrations" in tables:
        [(found,)] = db.execute("SELECT MAX(version) FROM schema_migrations")
        return int(found or 0)
    if "meta" in tables:
        return 1
    return None


def refuse_newer(db: Dialect, where: str) -> None:
    """ConfigError when the database's schema is newer than this code's."""
    found, latest = applied_version(db), latest_version(db.name)
    if found is not None and found > latest:
        raise ConfigError(
            f"database {where} has schema version {found}, newer than this devtrust's {latest} "
            f"(devtrust {__version__}): run the devtrust release that made it, or a newer one "
            "(the database is left as it is)"
        )


def migrate(db: Dialect, where: str) -> int:
    """Apply the steps the database lacks, in order; the version it is at now. ``where``
    names the database in messages (never with a password)."""
    refuse_newer(db, where)
    for step in migrations(db.name):
        db.begin()
        try:
            if not _apply(db, step, where):
                db.rollback()
                continue
        except BaseException:
            db.rollback()
            raise
        db.commit()
    return latest_version(db.name)


def _apply(db: Dialect, step: Migration, where: str) -> bool:
    """Run ``step`` in the open transaction and record it; False when it was applied
    already."""
    # Read again inside the transaction's lock: another process may have just migrated.
    tables = db.tables()
    if "schema_migrations" in tables and _run(db, _APPLIED, step.version):
        return False
    legacy = "meta" in tables and "schema_migrations" not in tables
    db.execute(db.bookkeeping)
    try:
        db.run_script(step)
        if step.version == 1 and legacy:
            db.complete_legacy()
    except db.errors as exc:
        raise ConfigError(
            f"database {where}: schema migration {step.label} failed ({exc}): it is left at "
            f"schema version {step.version - 1}, as it was; fix what the error names and "
            "start again"
        ) from exc
    _run(db, _RECORD, step.version, step.name)
    _run(db, _VERSION, str(step.version))
    return True


def _run(db: Dialect, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return db.execute(sql.replace("?", db.mark), params)
