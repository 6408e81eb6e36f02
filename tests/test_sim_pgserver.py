"""swtpm/pgserver.py: a throwaway PostgreSQL from the machine's binaries, started, restarted
on the same port with the same data, and stopped by its pid."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg
import pytest

from devtrust.swtpm.pgserver import PgServer


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_restart_keeps_the_port_and_the_data(tmp_path: Path, sig: int) -> None:
    server = PgServer(tmp_path / "pg").start()
    try:
        name = server.create_database()
        url = server.url(name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v TEXT)")
            conn.execute("INSERT INTO t VALUES ('kept')")
        port, pid = server.port, server.pid
        assert pid is not None
        server.restart(sig)
        assert server.port == port
        assert server.pid != pid
        assert not _alive(pid)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT v FROM t").fetchall() == [("kept",)]
    finally:
        server.close()


def test_the_url_needs_the_password_and_stop_ends_the_process(tmp_path: Path) -> None:
    server = PgServer(tmp_path / "pg").start()
    try:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(server.url(password="wrong"), connect_timeout=5).close()
        pid = server.pid
        assert pid is not None
        server.stop()
        assert server.pid is None
        assert not _alive(pid)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url(), connect_timeout=2).close()
    finally:
        root = server.root
        server.close()
    assert not (root.exists() and root != tmp_path / "pg")  # a temporary directory is removed


def test_database_names_are_checked(tmp_path: Path) -> None:
    server = PgServer(tmp_path / "pg").start()
    try:
        with pytest.raises(ValueError, match="letters, digits and _ only"):
            server.create_database("x; DROP DATABASE postgres")
    finally:
        server.close()
