"""The store's health probe (verifier/store_health.py) against a database that stops
answering: a probe past its timeout is not abandoned for a new one every half second (each
would hold one more pool thread and connection, review M1), and the outage classes (review
L7) tell a database that cannot be reached from a bug in the SQL."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from devtrust.verifier.store_health import StoreHealth, is_outage


def test_a_stuck_probe_is_waited_for_not_started_again() -> None:
    async def scenario() -> tuple[int, int, list[bool], bool]:
        release = asyncio.Event()
        running = 0
        most = 0

        async def probe() -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                await release.wait()  # a thread blocked on a black-holed connection
            finally:
                running -= 1

        health = StoreHealth(probe, interval_s=0.01, timeout_s=0.02)
        answers = [await health.check() for _ in range(5)]
        release.set()
        await asyncio.sleep(0)
        recovered = await health.check()
        return health.probes, most, answers, recovered

    probes, most, answers, recovered = asyncio.run(scenario())
    assert answers == [False] * 5  # down while it does not answer
    assert most == 1  # before the fix: five probes stuck at once
    assert probes == 2  # the stuck one, then one after it answered
    assert recovered


@pytest.mark.parametrize(
    ("message", "outage"),
    [
        ("database is locked", True),
        ("disk I/O error", True),
        ("unable to open database file", True),
        ("database or disk is full", True),
        ("no such table: devices", False),
        ('near "SELEC": syntax error', False),
        ("no such column: zone", False),
    ],
)
def test_only_sqlite_errors_of_an_unreachable_database_are_outages(
    message: str, outage: bool
) -> None:
    assert is_outage(sqlite3.OperationalError(message)) is outage


def test_a_real_sqlite_bug_is_no_outage(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "v.db") as db, pytest.raises(sqlite3.OperationalError) as err:
        db.execute("SELECT * FROM no_such_table")
    assert not is_outage(err.value)


def test_a_real_locked_sqlite_database_is_an_outage(tmp_path: Path) -> None:
    holder = sqlite3.connect(tmp_path / "v.db", isolation_level=None)
    other = sqlite3.connect(tmp_path / "v.db", timeout=0)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as err:
            other.execute("INSERT INTO t VALUES (1)")
        assert is_outage(err.value)
    finally:
        holder.close()
        other.close()
