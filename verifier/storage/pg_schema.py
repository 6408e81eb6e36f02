"""The PostgreSQL dialect of the schema migrations (``schema`` runs them; the steps are
``migrations/postgresql/``). Each step's transaction first takes a transaction-scoped
advisory lock, so that replicas started together migrate one after the other: the second
finds, under the lock, the steps the first applied (READ COMMITTED: each statement sees what
committed before it) and skips them.
"""

from __future__ import annotations

from typing import Any

import psycopg

from devtrust.verifier.storage import schema

DIALECT = "postgresql"
# The migrations' lock key (any fixed number used for nothing else; the feed's is in 0005).
MIGRATION_LOCK = 7202512000
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL,
    applied_at TEXT COLLATE "C" NOT NULL
        DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
)
"""


class PgDialect:
    """``schema.Dialect`` over one psycopg connection at READ COMMITTED, not autocommit."""

    name = DIALECT
    mark = "%s"
    bookkeeping = _MIGRATIONS_TABLE
    errors: tuple[type[Exception], ...] = (psycopg.Error,)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def tables(self) -> set[str]:
        rows = self._conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
        return {str(r[0]) for r in rows}

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = self._conn.execute(sql, params)
        return [tuple(row) for row in cur.fetchall()] if cur.description else []

    def run_script(self, step: schema.Migration) -> None:
        # No parameters: the whole script in one simple query, inside the open transaction.
        self._conn.execute(step.sql.encode())

    def begin(self) -> None:
        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        if not self._conn.closed:
            self._conn.rollback()

    def complete_legacy(self) -> None:
        """Nothing: PostgreSQL came after migrations."""
