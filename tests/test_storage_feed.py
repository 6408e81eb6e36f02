"""A change-feed row that cannot be decoded (review L4), on SQLite and PostgreSQL: it is
passed over and the consumers are told to reload (as after pruned rows), and the rows after
it still arrive. Before the fix the read raised at that row every second, for good, so
revocations and policy changes stopped reaching the process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from devtrust.verifier.storage import open_repositories
from devtrust.verifier.storage.changes import POLICY, Change
from devtrust.verifier.storage.repositories import SqlRepositories
from devtrust.verifier.storage.sql import Connection

pytest_plugins = ["tests.pg"]


def test_an_unreadable_row_is_passed_over_and_the_consumers_reload(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[list[list[str]], int, int, int]:
        repos = await open_repositories(database)
        assert isinstance(repos, SqlRepositories)
        feed = repos.change_feed("reader")
        got: list[list[str]] = []
        gaps = 0

        async def handler(batch: Sequence[Change]) -> None:
            got.append([c.kind + ":" + c.ref for c in batch])

        async def on_gap() -> None:
            nonlocal gaps
            gaps += 1

        feed.subscribe(handler, on_gap=on_gap)
        await feed.open()
        try:

            def poison(db: Connection) -> None:
                db.execute(
                    "INSERT INTO changes (kind, device_id, ref, origin, result) "
                    "VALUES ('trust', 'dev-x', '', 'other', '{not json')"
                )

            await repos.engine.write(poison)
            writer = repos.change_feed("writer")
            await writer.open()
            await writer.announce(POLICY, ref="p2")
            await writer.aclose()
            read = await feed.catch_up()
            again = await feed.catch_up()  # nothing left to read: the poison is behind
            return got, gaps, read, again
        finally:
            await feed.aclose()
            await repos.close()

    caplog.set_level(logging.WARNING)
    got, gaps, read, again = asyncio.run(scenario())
    assert got == [["policy:p2"]]
    assert gaps == 1
    assert (read, again) == (1, 0)
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
