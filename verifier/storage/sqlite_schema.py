"""Numbered schema migrations, applied in order when a database opens.

``migrations/NNNN_name.sql`` are the steps, 0001 being the schema of devtrust before
migrations (its ``meta`` table says schema_version 1). Each step runs in its own transaction
with its row in ``schema_migrations``, so a failed step leaves the database at the step
before. A database made before migrations has ``meta`` but no ``schema_migrations``: 0001 is
run on it again (it is idempotent DDL), which completes what older releases left out, and
recorded. A database whose steps go past the ones this code knows is refused: its schema
may mean things this code would get wrong.
"""

from __future__ import annotations

import importlib.resources
import re
import sqlite3
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from devtrust import __version__
from devtrust.core.errors import ConfigError

_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The script's statements, one by one: ``executescript`` would commit the
        transaction the step runs in."""
        out: list[str] = []
        current = ""
        for line in self.sql.splitlines(keepends=True):
            current += line
            if sqlite3.complete_statement(current):
                out.append(current.strip())
                current = ""
        rest = "\n".join(line for line in current.splitlines() if not line.strip().startswith("--"))
        if rest.strip():
            raise ValueError(f"migration {self.version:04d}_{self.name}: unterminated {rest!r}")
        return out


@cache
def migrations() -> tuple[Migration, ...]:
    """The steps shipped with this code, numbered 1, 2, ... without gaps."""
    folder = importlib.resources.files(__package__) / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"schema migrations not numbered 1..n: {[m.version for m in found]}")
    return tuple(found)


def latest_version() -> int:
    return len(migrations())


def _tables(db: sqlite3.Connection) -> set[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {str(r[0]) for r in rows}


def applied_version(db: sqlite3.Connection) -> int | None:
    """The last step applied; 1 for a database made before migrations; None for one that
    holds no verifier data."""
    tables = _tables(db)
    if "schema_migrations" in tables:
        row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)
    if "meta" in tables:
        return 1
    return None


def refuse_newer(db: sqlite3.Connection, path: Path) -> None:
    """ConfigError when the database's schema is newer than this code's."""
    found, latest = applied_version(db), latest_version()
    if found is not None and found > latest:
        raise ConfigError(
            f"database {path} has schema version {found}, newer than this devtrust's {latest} "
            f"(devtrust {__version__}): run the devtrust release that made it, or a newer one "
            "(the database is left as it is)"
        )


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Apply the steps the database lacks, in order; the version it is at now. ``db`` is in
    autocommit mode (isolation_level None)."""
    refuse_newer(db, path)
    for step in migrations():
        db.execute("BEGIN IMMEDIATE")
        try:
            # Read again inside the write lock: another process may have just migrated.
            tables = _tables(db)
            done = (
                "schema_migrations" in tables
                and db.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (step.version,)
                ).fetchone()
            )
            if done:
                db.execute("ROLLBACK")
                continue
            legacy = "meta" in tables and "schema_migrations" not in tables
            db.execute(_MIGRATIONS_TABLE)
            try:
                for statement in step.statements():
                    db.execute(statement)
                if step.version == 1 and legacy:
                    _complete_legacy(db)
            except sqlite3.Error as exc:
                raise ConfigError(
                    f"database {path}: schema migration {step.version:04d}_{step.name} failed "
                    f"({exc}): it is left at schema version {step.version - 1}, as it was; "
                    "fix what the error names and start again"
                ) from exc
            db.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                (step.version, step.name),
            )
            db.execute(
                "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE "
                "SET value = excluded.value",
                (str(step.version),),
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return latest_version()


def _complete_legacy(db: sqlite3.Connection) -> None:
    """What the code before migrations added to older databases when it opened them: the
    bootstrap token's zone and labels (issue 7)."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(bootstrap_tokens)")}
    for column, default in (("zone", "''"), ("labels", "'{}'")):
        if column not in columns:
            db.execute(
                f"ALTER TABLE bootstrap_tokens ADD COLUMN {column} TEXT NOT NULL DEFAULT {default}"
            )
