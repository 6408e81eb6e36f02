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


def test_a_busy_write_is_told_to_retry_but_health_stays_serving() -> None:
    """A write that lost every run to concurrent writes (StoreBusy: the database answers)
    answers the call UNAVAILABLE, so the agent tries again, but health stays SERVING (in the
    1,000-device burst it turned a replica NOT_SERVING as if its database were down); a
    database that does not answer still turns it NOT_SERVING."""
    import grpc
    from grpc_health.v1 import health, health_pb2

    from devtrust.verifier.interceptor import wrap_unary
    from devtrust.verifier.storage.sql import StoreBusy, StoreUnavailable

    class Context:
        code: grpc.StatusCode | None = None

        async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
            self.code = code
            raise grpc.aio.AbortError()

    async def call(health_of: StoreHealth, exc: Exception) -> grpc.StatusCode | None:
        async def behavior(request: object, context: object) -> None:
            raise exc

        context = Context()
        handler = wrap_unary("/t.T/M", behavior, outage=health_of.failed)
        with pytest.raises(grpc.aio.AbortError):
            await handler(None, context)
        return context.code

    async def status(servicer: health.aio.HealthServicer) -> int:
        request = health_pb2.HealthCheckRequest(service="")
        answer = await servicer.Check(request, None)
        return int(answer.status)

    async def scenario() -> None:
        async def probe() -> None:
            return None

        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        store = StoreHealth(probe, interval_s=60)
        store.serve(servicer, [""])
        busy = StoreBusy("a write lost 12 serialization conflicts in a row: try again")
        assert is_outage(busy)  # told UNAVAILABLE, never INTERNAL
        assert await call(store, busy) == grpc.StatusCode.UNAVAILABLE
        assert (store.up, store.outages, store.busy) == (True, 0, 1)
        assert await status(servicer) == health_pb2.HealthCheckResponse.SERVING
        down = StoreUnavailable("no connection to PostgreSQL within 15 s")
        assert await call(store, down) == grpc.StatusCode.UNAVAILABLE
        assert (store.up, store.outages) == (False, 1)
        assert await status(servicer) == health_pb2.HealthCheckResponse.NOT_SERVING

    asyncio.run(scenario())


def test_a_write_that_loses_every_run_raises_store_busy() -> None:
    """PostgreSQL's retries exhausted: StoreBusy (contention), not a bare StoreUnavailable."""
    from devtrust.verifier.storage import pg_engine
    from devtrust.verifier.storage.sql import StoreBusy

    conflict = RuntimeError("could not serialize access")
    pg_engine._conflicts(1, conflict, "db")  # a short wait, then another run
    with pytest.raises(StoreBusy, match=f"lost {pg_engine.MAX_ATTEMPTS} serialization"):
        pg_engine._conflicts(pg_engine.MAX_ATTEMPTS, conflict, "db")
