"""A real PostgreSQL for the tests, from the machine's binaries (``make test`` installs the
postgresql package). The server itself is ``devtrust.swtpm.pgserver.PgServer``, the one way
this project starts a throwaway PostgreSQL (``devtrust simulate --postgres`` uses it too):
initdb into a temporary directory, a free loopback port, the unix socket in that directory,
password (scram) authentication so URLs carry credentials, stopped by its pid, run as
``nobody`` as root. One server per test process, started at first use; each test gets a
fresh database (CREATE DATABASE ... TEMPLATE template0).

Fault tests restart it (``restart``: same port, same data).
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtrust.swtpm.pgserver import USER, PgServer, PgServerError

__all__ = ["BACKENDS", "USER", "PgServer", "database", "pg_server", "pg_url", "server"]

_SERVERS: list[PgServer] = []


def server() -> PgServer:
    """This test process's PostgreSQL, started at first use, stopped at exit."""
    if not _SERVERS:
        try:
            started = PgServer().start()
        except PgServerError as exc:
            pytest.fail(f"{exc} (`make test` installs the postgresql package)")
        _SERVERS.append(started)
        atexit.register(started.close)
    elif _SERVERS[0].process is None:
        _SERVERS[0].start()
    return _SERVERS[0]


@pytest.fixture
def pg_server() -> PgServer:
    """The tests' PostgreSQL (to restart it, or to read its password)."""
    return server()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh, empty database on the tests' PostgreSQL."""
    pg = server()
    name = pg.create_database()
    yield pg.url(name)
    with contextlib.suppress(psycopg.Error):
        pg.drop_database(name)


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of each backend, as `database:` names it: an SQLite file, then a
    PostgreSQL URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "verifier.db")
        return
    pg = server()
    name = pg.create_database()
    yield pg.url(name)
    with contextlib.suppress(psycopg.Error):
        pg.drop_database(name)
