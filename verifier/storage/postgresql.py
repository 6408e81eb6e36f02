"""The repositories over PostgreSQL, the database replicas share: the engine of
``pg_engine`` (a bounded pool, SERIALIZABLE writes run again on conflicts), migrations at
open under an advisory lock (``pg_schema``), the change feed followed by LISTEN/NOTIFY
(``pg_feed``). The repositories' code and SQL are the neutral ones (``repositories``).

The URL is libpq's (postgresql://user:password@host:port/dbname?sslmode=...) plus one
parameter of ours, ``pool_size`` (connections this process holds at most; default 10),
taken out before libpq sees it. Messages and log lines name the URL without its password,
and libpq's own errors (which may quote it) are shown with it written as ***.

Every connection is bounded (review M1), so that a database host that dies or a network
that black-holes its packets cannot hold the pool's threads, or a lock another replica
waits for, for long: TCP keepalives and a TCP user timeout (TCP_SETTINGS: a dead peer is
noticed within about 25 s, idle or not) and server-side timeouts (SESSION_SETTINGS: a
statement, a lock wait, a transaction left idle). Each is libpq's parameter and may be set
in the URL, which wins: ``?keepalives_idle=30&tcp_user_timeout=60000`` or
``?options=-c%20statement_timeout%3D2min``. The migration at open waits longer
(MIGRATION_SETTINGS): it may wait for another replica's migration.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import DatabaseUrl
from devtrust.verifier.storage import schema
from devtrust.verifier.storage.changes import ChangeFeed
from devtrust.verifier.storage.pg_engine import (
    POOL_SIZE,
    RECONNECT_S,
    PgEngine,
    PgRow,
    hide,
    pg_rows,
    secrets_of,
)
from devtrust.verifier.storage.pg_feed import PgChangeFeed
from devtrust.verifier.storage.pg_schema import PgDialect
from devtrust.verifier.storage.repositories import SqlRepositories

# Seconds a connection attempt waits for the server (libpq's connect_timeout).
CONNECT_TIMEOUT_S = 5
MAX_POOL = 200
# libpq's TCP parameters, unless the URL gives them: keepalive probes after 10 s idle, every
# 5 s, 3 unanswered ones drop the connection; data unacknowledged for 20 s drops it too.
TCP_SETTINGS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
}
# The server's limits on each session (passed as libpq's ``options``; the URL's own
# ``options`` come after, so a -c there wins). The repositories' statements touch a few rows
# or one bounded page; their transactions never wait on anything outside the database.
SESSION_SETTINGS = {
    "statement_timeout": "30s",
    "lock_timeout": "10s",
    "idle_in_transaction_session_timeout": "15s",
}
# The migration's connection: a step may be long, and waits for another replica's.
MIGRATION_SETTINGS = {"statement_timeout": "10min", "lock_timeout": "10min"}


class PgRepositories(SqlRepositories):
    """Every repository over one PostgreSQL database; made by ``open_postgresql``."""

    def __init__(self, engine: PgEngine, conninfo: str) -> None:
        super().__init__(engine)
        self._pg = engine
        self._conninfo = conninfo

    @property
    def engine(self) -> PgEngine:
        return self._pg

    def change_feed(self, origin: str) -> ChangeFeed:
        return PgChangeFeed(self._pg, self._conninfo, origin=origin)


def conninfo(url: DatabaseUrl) -> tuple[str, int]:
    """libpq's URL (without ``pool_size``, with the bounds of TCP_SETTINGS and
    SESSION_SETTINGS the URL does not set itself) and the pool's size."""
    text = str.__str__(url)
    parts = urllib.parse.urlsplit(text)
    kept, size, options = [], POOL_SIZE, ""
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "options":
            options = value
            continue
        if key != "pool_size":
            kept.append((key, value))
            continue
        if not value.isdigit() or not 1 <= int(value) <= MAX_POOL:
            raise ConfigError(
                f"database {url}: pool_size={value!r}: give the connections each verifier "
                f"process may hold, 1 to {MAX_POOL}"
            )
        size = int(value)
    given = {key for key, _ in kept}
    kept += [(key, value) for key, value in TCP_SETTINGS.items() if key not in given]
    ours = " ".join(f"-c {key}={value}" for key, value in SESSION_SETTINGS.items())
    kept.append(("options", f"{ours} {options}".strip()))
    # libpq decodes %XX only (a + stays a +): spaces go as %20.
    query = urllib.parse.urlencode(kept, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit(parts._replace(query=query)), size


def connect(info: str, where: str, *, named: str = "`database:`") -> psycopg.Connection[PgRow]:
    """A connection, or ConfigError in one line: what failed and what to fix."""
    try:
        return psycopg.connect(info, connect_timeout=CONNECT_TIMEOUT_S, row_factory=pg_rows)
    except psycopg.Error as exc:
        raise ConfigError(explain(exc, where, named=named, secrets=secrets_of(info))) from None


def explain(
    exc: psycopg.Error, where: str, *, named: str = "`database:`", secrets: Sequence[str] = ()
) -> str:
    """One line: what failed (libpq's words, without ``secrets``) and what to fix."""
    detail = hide(" ".join(str(exc).split()), secrets)
    low = detail.lower()
    if exc.sqlstate in ("28P01", "28000") or "password" in low or "authentication" in low:
        return (
            f"database {where}: PostgreSQL refused the credentials ({detail}): fix the user "
            f"and password in {named}"
        )
    if exc.sqlstate == "3D000" or ("database" in low and "does not exist" in low):
        return (
            f"database {where}: the server has no such database ({detail}): create it "
            f"(createdb -O USER NAME) or fix its name in {named}"
        )
    return (
        f"database {where}: cannot reach PostgreSQL ({detail}): start the server, or fix "
        f"the host and port in {named}"
    )


def _prepare(info: str, where: str, *, create: bool, read_only: bool) -> None:
    """The schema migrated (or, read-only or ``create`` False, checked to be a verifier's
    that this code can read)."""
    named = "--database" if read_only else "`database:`"
    conn = connect(info, where, named=named)
    try:
        conn.autocommit = True  # session settings, outside the steps' transactions
        for key, value in MIGRATION_SETTINGS.items():
            conn.execute(f"SET {key} = '{value}'")
        conn.autocommit = False
        dialect = PgDialect(conn)
        if (read_only or not create) and schema.applied_version(dialect) is None:
            raise ConfigError(
                f"database {where} holds no verifier data: run `devtrust-verifier serve` "
                f"once, or fix {named}"
            )
        if read_only:
            schema.refuse_newer(dialect, where)
        else:
            schema.migrate(dialect, where)
        conn.rollback()
    finally:
        conn.close()


def _open(url: DatabaseUrl, *, create: bool, read_only: bool) -> PgRepositories:
    info, size = conninfo(url)
    where = url.redacted
    _prepare(info, where, create=create, read_only=read_only)
    kwargs: dict[str, Any] = {"row_factory": pg_rows, "connect_timeout": CONNECT_TIMEOUT_S}
    pool: ConnectionPool[psycopg.Connection[PgRow]] = ConnectionPool(
        info,
        min_size=1,
        max_size=size,
        kwargs=kwargs,
        open=False,
        name="devtrust",
        timeout=RECONNECT_S,
    )
    try:
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
    except PoolTimeout:
        pool.close()
        raise ConfigError(
            f"database {where}: no connection within {CONNECT_TIMEOUT_S * 2} s: is the server "
            "running and accepting connections?"
        ) from None
    engine = PgEngine(where, pool, read_only=read_only, secrets=secrets_of(str.__str__(url), info))
    return PgRepositories(engine, info)


async def open_postgresql(
    url: DatabaseUrl, *, create: bool = True, read_only: bool = False
) -> PgRepositories:
    """The verifier's repositories over the PostgreSQL database of ``url``, migrated to
    this code's schema (a newer one is refused; ``read_only`` never migrates nor writes;
    ``create`` False: a database without verifier data is refused, not filled)."""
    return await asyncio.to_thread(_open, url, create=create, read_only=read_only)
