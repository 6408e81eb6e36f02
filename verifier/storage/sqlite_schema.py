"""The SQLite dialect of the schema migrations (``schema`` runs them; the steps are
``migrations/sqlite/``): how a script runs inside a transaction, which tables there are,
the write lock that keeps other processes off while a step runs, and what the code before
migrations added to older databases.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from devtrust.verifier.storage import schema

DIALECT = "sqlite"
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""


def statements(script: str, *, label: str = "script") -> list[str]:
    """The script's statements, one by one: ``executescript`` would commit the transaction
    the step runs in."""
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    rest = "\n".join(line for line in current.splitlines() if not line.strip().startswith("--"))
    if rest.strip():
        raise ValueError(f"migration {label}: unterminated {rest!r}")
    return out


class SqliteDialect:
    """``schema.Dialect`` over one connection in autocommit mode (isolation_level None)."""

    name = DIALECT
    mark = "?"
    bookkeeping = _MIGRATIONS_TABLE
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def tables(self) -> set[str]:
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(r[0]) for r in rows.fetchall()}

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._db.execute(sql, params).fetchall()]

    def run_script(self, step: schema.Migration) -> None:
        for statement in statements(step.sql, label=step.label):
            self._db.execute(statement)

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def complete_legacy(self) -> None:
        """The bootstrap token's zone and labels (issue 7)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(bootstrap_tokens)")}
        for column, default in (("zone", "''"), ("labels", "'{}'")):
            if column not in columns:
                self._db.execute(
                    f"ALTER TABLE bootstrap_tokens ADD COLUMN {column} TEXT NOT NULL "
                    f"DEFAULT {default}"
                )


def latest_version() -> int:
    return schema.latest_version(DIALECT)


def applied_version(db: sqlite3.Connection) -> int | None:
    return schema.applied_version(SqliteDialect(db))


def refuse_newer(db: sqlite3.Connection, path: Path) -> None:
    schema.refuse_newer(SqliteDialect(db), str(path))


def migrate(db: sqlite3.Connection, path: Path) -> int:
    return schema.migrate(SqliteDialect(db), str(path))
