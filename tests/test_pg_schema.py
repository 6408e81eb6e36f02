"""The PostgreSQL dialect of the migrations (a real server: tests/pg.py): every step applied
once, in order, the same numbering as SQLite; replicas starting together migrate one after
the other (the advisory lock); a newer schema is refused; read-only never migrates."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from devtrust.core.errors import ConfigError
from devtrust.verifier.storage import open_repositories, pg_schema, schema
from tests.db import NOW, run

# The fixtures `database` (each test on SQLite and PostgreSQL) and `pg_url`.
pytest_plugins = ["tests.pg"]


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]


async def _open_close(url: str, **kwargs: bool) -> None:
    repos = await open_repositories(url, **kwargs)
    await repos.close()


def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    async def together() -> None:
        await asyncio.gather(*(_open_close(pg_url) for _ in range(4)))

    run(together)
    latest = schema.latest_version(pg_schema.DIALECT)
    assert latest == schema.latest_version("sqlite")
    assert _versions(pg_url) == list(range(1, latest + 1))
    run(lambda: _open_close(pg_url))  # again: nothing applied twice
    assert _versions(pg_url) == list(range(1, latest + 1))


def test_without_the_lock_replicas_starting_together_collide(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above fails without the lock: migrators race on step 1."""
    monkeypatch.setattr(pg_schema.PgDialect, "begin", lambda self: None)

    async def together() -> list[BaseException | None]:
        return await asyncio.gather(
            *(_open_close(pg_url) for _ in range(4)), return_exceptions=True
        )

    outcomes = run(together)
    assert any(isinstance(o, Exception) for o in outcomes), outcomes


def test_an_empty_database_is_refused_read_only_and_a_newer_one_always(pg_url: str) -> None:
    with pytest.raises(ConfigError, match="holds no verifier data: run `devtrust-verifier serve`"):
        run(lambda: _open_close(pg_url, read_only=True))
    assert not _versions_exist(pg_url)
    run(lambda: _open_close(pg_url))
    newer = schema.latest_version(pg_schema.DIALECT) + 1
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'future')", (newer,)
        )
    for read_only in (False, True):
        with pytest.raises(ConfigError, match=f"has schema version {newer}, newer than"):
            run(lambda: _open_close(pg_url, read_only=read_only))  # noqa: B023


def _versions_exist(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return bool(
            conn.execute("SELECT 1 FROM pg_tables WHERE tablename = 'schema_migrations'").fetchall()
        )


def test_read_only_reads_and_writes_nothing(pg_url: str) -> None:
    run(lambda: _open_close(pg_url))

    async def scenario() -> None:
        repos = await open_repositories(pg_url, create=False, read_only=True)
        try:
            assert await repos.counts() == dict.fromkeys(
                (
                    "devices",
                    "enrollments",
                    "trust",
                    "certificates",
                    "audit",
                    "tpm_state",
                    "event_log_parts",
                ),
                0,
            )
            with pytest.raises(ValueError, match="is open read-only: nothing is written"):
                await repos.roles.set("alice", "admin", now=NOW, actor="local/root")
        finally:
            await repos.close()

    run(scenario)
