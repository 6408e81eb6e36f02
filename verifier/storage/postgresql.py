"""The repositories over PostgreSQL, the database replicas share: the engine of
``pg_engine`` (a bounded pool, SERIALIZABLE writes run again on conflicts), migrations at
open under an advisory lock (``pg_schema``), the change feed followed by LISTEN/NOTIFY
(``pg_feed``). The repositories' code and SQL are the neutral ones (``repositories``).

The URL is libpq's (postgresql://user:password@host:port/dbname?sslmode=...) plus one
parameter of ours, ``pool_size`` (connections this process holds at most; default 10),
taken out before libpq sees it. Messages name the URL without its password.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import DatabaseUrl
from devtrust.verifier.storage import schema
from devtrust.verifier.storage.changes import ChangeFeed
from devtrust.verifier.storage.pg_engine import POOL_SIZE, RECONNECT_S, PgEngine, PgRow, pg_rows
from devtrust.verifier.storage.pg_feed import PgChangeFeed
from devtrust.verifier.storage.pg_schema import PgDialect
from devtrust.verifier.storage.repositories import SqlRepositories

# Seconds a connection attempt waits for the server (libpq's connect_timeout).
CONNECT_TIMEOUT_S = 5
MAX_POOL = 200


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
    """libpq's URL (without ``pool_size``) and the pool's size."""
    text = str.__str__(url)
    parts = urllib.parse.urlsplit(text)
    kept, size = [], POOL_SIZE
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key != "pool_size":
            kept.append((key, value))
            continue
        if not value.isdigit() or not 1 <= int(value) <= MAX_POOL:
            raise ConfigError(
                f"database {url}: pool_size={value!r}: give the connections each verifier "
                f"process may hold, 1 to {MAX_POOL}"
            )
        size = int(value)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept))), size


def connect(info: str, where: str, *, named: str = "`database:`") -> psycopg.Connection[PgRow]:
    """A connection, or ConfigError in one line: what failed and what to fix."""
    try:
        return psycopg.connect(info, connect_timeout=CONNECT_TIMEOUT_S, row_factory=pg_rows)
    except psycopg.Error as exc:
        raise ConfigError(explain(exc, where, named=named)) from None


def explain(exc: psycopg.Error, where: str, *, named: str = "`database:`") -> str:
    detail = " ".join(str(exc).split())
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
    return PgRepositories(PgEngine(where, pool, read_only=read_only), info)


async def open_postgresql(
    url: DatabaseUrl, *, create: bool = True, read_only: bool = False
) -> PgRepositories:
    """The verifier's repositories over the PostgreSQL database of ``url``, migrated to
    this code's schema (a newer one is refused; ``read_only`` never migrates nor writes;
    ``create`` False: a database without verifier data is refused, not filled)."""
    return await asyncio.to_thread(_open, url, create=create, read_only=read_only)
