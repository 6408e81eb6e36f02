"""PostgreSQL connections are bounded (review M1) and never show the password (review M7),
against the tests' real PostgreSQL.

M1: every connection carries TCP keepalives, a TCP user timeout and the server-side
statement, lock and idle-in-transaction timeouts (defaults in ``postgresql``; the URL's own
values win), so a write stuck behind a lock another replica holds is cut instead of holding
a pool thread for ever. M7: libpq's errors (its URL parser quotes the token it failed on) and
log lines come with the password written as ***.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from devtrust.core.errors import ConfigError
from devtrust.swtpm.pgserver import PgServer
from devtrust.verifier.config import DatabaseUrl
from devtrust.verifier.records import DeviceState
from devtrust.verifier.storage import open_repositories, postgresql
from devtrust.verifier.storage.pg_engine import PgEngine
from devtrust.verifier.storage.postgresql import PgRepositories
from devtrust.verifier.storage.sql import Connection
from tests.db import NOW, device

pytest_plugins = ["tests.pg"]
T = TypeVar("T")
SECRET = "Zq7DistinctPw"


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


def _settings(repos: PgRepositories) -> list[str]:
    def work(db: Connection) -> list[str]:
        return [
            str(db.execute(f"SHOW {name}").fetchone()[0])
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
        ]

    return run(lambda: repos.engine.read(work))


def test_connections_carry_the_bounds_by_default(pg_url: str) -> None:
    info, _ = postgresql.conninfo(DatabaseUrl(pg_url))
    params = conninfo_to_dict(info)
    for key, value in postgresql.TCP_SETTINGS.items():
        assert params[key] == value
    repos = run(lambda: open_repositories(pg_url))
    try:
        assert isinstance(repos, PgRepositories)
        assert _settings(repos) == ["30s", "10s", "15s"]
        # The LISTEN connection of the change feed connects with the same parameters.
        with psycopg.connect(info) as conn:
            shown = conn.execute("SHOW statement_timeout").fetchone()
            assert shown is not None
            assert shown[0] == "30s"
            assert conn.info.get_parameters()["keepalives_idle"] == "10"
    finally:
        run(repos.close)


def test_the_url_sets_the_bounds_itself(pg_url: str) -> None:
    url = (
        f"{pg_url}?keepalives_idle=42&tcp_user_timeout=9000"
        "&options=-c%20statement_timeout%3D2min%20-c%20lock_timeout%3D3s"
    )
    params = conninfo_to_dict(postgresql.conninfo(DatabaseUrl(url))[0])
    assert params["keepalives_idle"] == "42"
    assert params["tcp_user_timeout"] == "9000"
    assert params["keepalives_count"] == "3"
    repos = run(lambda: open_repositories(url))
    try:
        assert isinstance(repos, PgRepositories)
        assert _settings(repos) == ["2min", "3s", "15s"]
    finally:
        run(repos.close)


def test_a_write_stuck_behind_another_replicas_lock_is_cut(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica holds the device's row (its host gone mid-transaction, say): this write
    fails after lock_timeout (1 s here) instead of holding its thread until that ends."""
    monkeypatch.setitem(postgresql.SESSION_SETTINGS, "lock_timeout", "1s")
    repos = run(lambda: open_repositories(pg_url))
    assert isinstance(repos, PgRepositories)
    record = device(1)
    run(lambda: repos.devices.save(record, now=NOW, event="enrolled:enrolled"))
    holder = psycopg.connect(pg_url)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        holder.execute("SELECT 1 FROM devices WHERE device_id = %s FOR UPDATE", (record.device_id,))
        started = time.monotonic()
        write = pool.submit(
            run,
            lambda: repos.devices.set_state(
                record.device_id, DeviceState.REVOKED, now=NOW, event="revoked"
            ),
        )
        with pytest.raises(psycopg.errors.LockNotAvailable):
            write.result(timeout=8)  # without the bound: still waiting here
        assert time.monotonic() - started < 5
    finally:
        holder.close()
        pool.shutdown(wait=True)
        run(repos.close)


# --- M7: the password in no message -----------------------------------------------------


def _refusal(url: str) -> str:
    with pytest.raises(ConfigError) as err:
        run(lambda: open_repositories(url))
    return str(err.value)


def test_no_connection_error_or_log_line_shows_the_password(
    pg_server: PgServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = f"127.0.0.1:{pg_server.port}/postgres"
    urls = [
        f"postgresql://devtrust:pa%zz{SECRET}@{base}",  # libpq: invalid percent-encoded token
        f"postgresql://devtrust:{SECRET}@{base}",  # a wrong password
        f"postgresql://devtrust@{base}?password={SECRET}&sslmode=bogus",  # libpq: invalid sslmode
        f"postgresql://devtrust@{base}?password=pa%zz{SECRET}",
        f"postgresql://devtrust:{SECRET}@127.0.0.1:1/postgres",  # nobody listens
    ]
    messages = [_refusal(url) for url in urls]
    assert "invalid percent-encoded token" in messages[0]
    assert "password authentication failed" in messages[1]
    for message in messages:
        assert SECRET not in message, message
        assert "\n" not in message
    for record in caplog.records:
        assert SECRET not in record.getMessage()


def test_the_pools_log_lines_hide_the_password(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg_pool's reconnect warnings quote libpq's errors: filtered while a pool is open."""
    repos = run(lambda: open_repositories(pg_url))
    assert isinstance(repos, PgRepositories)
    engine: Any = repos.engine
    assert isinstance(engine, PgEngine)
    password = engine.secrets[0]
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    try:
        logging.getLogger("psycopg.pool").warning("error connecting: token %r", password)
    finally:
        run(repos.close)
    assert caplog.records
    assert password not in caplog.records[0].getMessage()
    assert "***" in caplog.records[0].getMessage()
