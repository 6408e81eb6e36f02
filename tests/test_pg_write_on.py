"""``pg_engine.write_on`` (review L3): a write on a command's own connection follows the
engine's rules, against the tests' real PostgreSQL: a serialization failure and a deadlock
are run again; a connection lost before COMMIT or during it raises StoreUnavailable (one
line, "nothing was written" or "unknown"), never the driver's error."""

from __future__ import annotations

import psycopg
import pytest

from devtrust.verifier.storage.pg_engine import PgConnection, PgRow, pg_rows, write_on
from devtrust.verifier.storage.sql import StoreUnavailable

pytest_plugins = ["tests.pg"]


def _connect(url: str) -> psycopg.Connection[PgRow]:
    return psycopg.connect(url, row_factory=pg_rows)


def test_conflicts_and_deadlocks_are_run_again(pg_url: str) -> None:
    with _connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (x INT)")
        conn.commit()
        failures: list[Exception] = [
            psycopg.errors.SerializationFailure("could not serialize"),
            psycopg.errors.DeadlockDetected("deadlock detected"),  # the old copy raised this
        ]

        def work(db: PgConnection) -> int:
            db.execute("INSERT INTO t VALUES (?)", (len(failures),))
            if failures:
                raise failures.pop(0)
            return 7

        assert write_on(conn, work, where="test") == 7
        row = conn.execute("SELECT array_agg(x) FROM t").fetchone()
        assert row is not None
        assert row[0] == [0]


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_lost_before_commit_raises_nothing_written(pg_url: str) -> None:
    with _connect(pg_url) as conn:
        pid = conn.info.backend_pid

        def work(db: PgConnection) -> None:
            _terminate(pg_url, pid)
            db.execute("SELECT 1")

        with pytest.raises(StoreUnavailable, match="nothing was written"):
            write_on(conn, work, where="test")


def test_a_connection_lost_during_commit_raises_outcome_unknown(pg_url: str) -> None:
    with _connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (x INT)")
        conn.commit()
        pid = conn.info.backend_pid

        def work(db: PgConnection) -> None:
            db.execute("INSERT INTO t VALUES (1)")
            _terminate(pg_url, pid)  # the COMMIT that follows meets a dead connection

        with pytest.raises(StoreUnavailable, match="whether this write was stored is unknown"):
            write_on(conn, work, where="test")
