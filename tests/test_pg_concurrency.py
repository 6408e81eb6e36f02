"""Two replicas on one PostgreSQL (two Repositories, each with its own pool, on one real
database: tests/pg.py), racing where the single-writer logic of SQLite would be lost without
SERIALIZABLE writes. Each race is made deterministic: one transaction is held after its
reads (``Held``) until the other committed. Each check also runs at READ COMMITTED, where it
must be lost: the isolation, not luck, is what keeps it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from psycopg import IsolationLevel

from devtrust.core.ids import Serial
from devtrust.core.tier import Tier
from devtrust.verifier.decision import DeviceChanged
from devtrust.verifier.errors import ResourceExhausted
from devtrust.verifier.records import (
    AuditEvent,
    CertificateRecord,
    DeviceState,
    PendingEnrollment,
    Standing,
)
from devtrust.verifier.storage import admin, enroll, open_repositories, pg_engine, trust_rows
from devtrust.verifier.storage.postgresql import PgRepositories
from devtrust.verifier.storage.sql import Connection, Cursor
from tests.db import NOW, decision, device, device_id

T = TypeVar("T")
# The fixture `pg_url`: a fresh database on the tests' PostgreSQL.
pytest_plugins = ["tests.pg"]
ISOLATIONS = {
    "serializable": IsolationLevel.SERIALIZABLE,
    "read committed": IsolationLevel.READ_COMMITTED,
}


@pytest.fixture(params=list(ISOLATIONS))
def isolation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(pg_engine, "WRITE_ISOLATION", ISOLATIONS[request.param])
    return str(request.param)


@pytest.fixture
def replicas(pg_url: str) -> Iterator[tuple[PgRepositories, PgRepositories]]:
    """Two replicas' repositories on one database, each with its own pool (and a device)."""
    loop = asyncio.new_event_loop()

    async def both() -> tuple[PgRepositories, PgRepositories]:
        a = await open_repositories(pg_url)
        b = await open_repositories(pg_url)
        assert isinstance(a, PgRepositories)
        assert isinstance(b, PgRepositories)
        await a.devices.save(device(1), now=NOW, event="enrolled:enrolled")
        return a, b

    a, b = loop.run_until_complete(both())
    yield a, b
    loop.run_until_complete(a.close())
    loop.run_until_complete(b.close())
    loop.close()


class Held:
    """A connection that stops before the first statement starting with ``prefix`` (in its
    first attempt only) until ``go`` is set; ``reached`` is set when it stops."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.reached = threading.Event()
        self.go = threading.Event()
        self._done = False

    def wrap(self, db: Connection) -> Connection:
        held = self

        class Wrapped:
            def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
                if not held._done and sql.lstrip().startswith(held.prefix):
                    held._done = True
                    held.reached.set()
                    assert held.go.wait(20)
                return db.execute(sql, parameters)

            def executemany(self, sql: str, parameters: Any, /) -> Cursor:
                return db.executemany(sql, parameters)

        return Wrapped()


def _race(
    held: Held,
    first: Callable[[], T],
    second: Callable[[], Any],
) -> tuple[Future[T], Future[Any]]:
    """``first`` (through ``held``) stops after its reads; ``second`` runs and commits;
    then ``first`` goes on."""
    pool = ThreadPoolExecutor(max_workers=2)
    one = pool.submit(first)
    assert held.reached.wait(20)
    two = pool.submit(second)
    two.exception(timeout=20)  # finished (committed or failed)
    held.go.set()
    one.exception(timeout=30)
    pool.shutdown()
    return one, two


def _certificate(n: int, serial: str) -> CertificateRecord:
    return CertificateRecord(
        serial=Serial(serial),
        device_id=device_id(n),
        kind="device",
        not_before=NOW,
        not_after=NOW + datetime.timedelta(hours=1),
        der=b"der",
    )


# --- the races -------------------------------------------------------------------------------


def test_a_device_revoked_while_its_evidence_is_stored_keeps_no_live_certificate(
    replicas: tuple[PgRepositories, PgRepositories], isolation: str
) -> None:
    """Replica A stores a decision with a certificate (the device read as enrolled), while
    replica B revokes the device (its live certificates read: none yet)."""
    a, b = replicas
    # The device appraised before at the same tier: this decision changes no tier, so it
    # writes no change row (whose lock would make the revocation wait for it).
    asyncio.run(a.trust.record(decision(1, at=NOW - datetime.timedelta(minutes=1))))
    made = dataclasses.replace(
        decision(1), assumed=device(1), certificate=_certificate(1, "c1"), withheld=""
    )
    held = Held("UPDATE devices SET last_seen")

    def store() -> object:
        return a.engine.run_write(lambda db: trust_rows.record(held.wrap(db), made))

    def revoke() -> object:
        async def go() -> object:
            return await b.revocations.revoke_device(
                device_id(1), reason="test", actor="operator/x", now=NOW
            )

        return asyncio.run(go())

    stored, revoked = _race(held, store, revoke)
    assert revoked.exception() is None

    async def live() -> list[CertificateRecord]:
        return await b.revocations.live_certificates(device_id(1), NOW)

    left = asyncio.run(live())
    if isolation == "serializable":
        # A's transaction lost the conflict, ran again, saw the device revoked.
        assert isinstance(stored.exception(), DeviceChanged)
        assert left == []
    else:
        assert stored.exception() is None
        assert [c.serial for c in left] == ["c1"]  # a revoked device with a live certificate


def test_two_operators_changing_one_device_lose_no_update(
    replicas: tuple[PgRepositories, PgRepositories], isolation: str
) -> None:
    a, b = replicas
    before = Standing(state=DeviceState.ENROLLED, zone="", labels={})
    held = Held("UPDATE devices SET state")

    def change(repos: PgRepositories, zone: str, hold: Held | None) -> bool:
        def work(db: Connection) -> bool:
            ops = admin.SqlOperations(_Direct(hold.wrap(db) if hold else db))
            return asyncio.run(
                ops.apply(
                    device_id(1),
                    before=before,
                    after=Standing(state=DeviceState.ENROLLED, zone=zone, labels={}),
                    events=[AuditEvent(event="assigned:operator", detail={"zone": zone})],
                    actor=f"operator/{zone}",
                    now=NOW,
                )
            )

        return repos.engine.run_write(work)

    first, second = _race(held, lambda: change(a, "one", held), lambda: change(b, "two", None))
    assert second.result() is True

    async def zone() -> str:
        found = await a.devices.get(device_id(1))
        assert found is not None
        return found.zone

    if isolation == "serializable":
        assert first.result() is False  # ran again, found the device changed: caller rereads
        assert asyncio.run(zone()) == "two"
    else:
        assert first.result() is True  # both "won": "two" was overwritten unseen
        assert asyncio.run(zone()) == "one"


def test_a_device_waiting_enrollments_stay_bounded_across_replicas(
    replicas: tuple[PgRepositories, PgRepositories], isolation: str
) -> None:
    a, b = replicas
    held = Held("INSERT INTO enrollments")

    def put(repos: PgRepositories, n: int, hold: Held | None) -> None:
        pending = PendingEnrollment(
            enrollment_id=f"e{n}",
            record=device(7),
            secret=b"s",
            channel_key_spki=b"k",
            expires_at=NOW + datetime.timedelta(minutes=5),
        )

        def work(db: Connection) -> None:
            store = enroll.SqlEnrollments(_Direct(hold.wrap(db) if hold else db))
            asyncio.run(store.put(pending, now=NOW, max_per_device=1, max_total=100))

        repos.engine.run_write(work)

    first, second = _race(held, lambda: put(a, 1, held), lambda: put(b, 2, None))
    assert second.exception() is None

    async def waiting() -> list[str]:
        found = [await a.enrollments.get(e) for e in ("e1", "e2")]
        return [p.enrollment_id for p in found if p is not None]

    if isolation == "serializable":
        assert isinstance(first.exception(), ResourceExhausted)
        assert asyncio.run(waiting()) == ["e2"]
    else:
        assert first.exception() is None
        assert asyncio.run(waiting()) == ["e1", "e2"]  # past max_pending_per_device


class _Direct:
    """An engine that runs work on the one connection it holds: a repository's work made
    to run inside a transaction the test drives."""

    sql = pg_engine.PgEngine.sql
    location = "test"

    def __init__(self, db: Connection) -> None:
        self._db = db

    async def write(self, work: Callable[[Connection], T]) -> T:
        return work(self._db)

    async def read(self, work: Callable[[Connection], T]) -> T:
        return work(self._db)

    def close(self) -> None:
        return None


# --- many at once, across the replicas ----------------------------------------------------


def _gather(*coros: Any) -> list[Any]:
    async def main() -> list[Any]:
        return await asyncio.gather(*coros, return_exceptions=True)

    return asyncio.run(main())


def test_a_bootstrap_token_is_spent_once(replicas: tuple[PgRepositories, PgRepositories]) -> None:
    """Its guard is the conditional UPDATE (the row locked, its condition read again after
    the other's commit): it holds at any isolation, and is lost without its WHERE."""
    a, b = replicas
    asyncio.run(a.tokens.add("t" * 64, now=NOW, expires_at=NOW + datetime.timedelta(hours=1)))
    outcomes = _gather(
        *(
            (a if n % 2 else b).tokens.use("t" * 64, device_id=device_id(100 + n), now=NOW)
            for n in range(16)
        )
    )
    assert sorted(map(str, outcomes)) == ["False"] * 15 + ["True"]


def test_an_enrollment_is_answered_once(replicas: tuple[PgRepositories, PgRepositories]) -> None:
    a, b = replicas
    pending = PendingEnrollment(
        enrollment_id="once",
        record=device(8),
        secret=b"s",
        channel_key_spki=b"k",
        expires_at=NOW + datetime.timedelta(minutes=5),
    )
    asyncio.run(a.enrollments.put(pending, now=NOW, max_per_device=4, max_total=100))
    outcomes = _gather(*((a if n % 2 else b).enrollments.take("once") for n in range(16)))
    assert sorted(map(str, outcomes)) == ["False"] * 15 + ["True"]


def test_trust_rows_keep_the_newest_result_whatever_the_commit_order(
    replicas: tuple[PgRepositories, PgRepositories],
) -> None:
    a, b = replicas
    times = [NOW + datetime.timedelta(seconds=s) for s in range(12)]
    tiers = [Tier.AFFIRMING, Tier.WARNING, Tier.CONTRAINDICATED]
    outcomes = _gather(
        *(
            (a if n % 2 else b).trust.record(decision(1, at=at, tier=tiers[n % 3]))
            for n, at in enumerate(reversed(times))
        )
    )
    assert not [o for o in outcomes if isinstance(o, BaseException)]

    async def latest() -> tuple[datetime.datetime, datetime.datetime | None]:
        result = await b.trust.latest(device_id(1))
        record = await b.devices.get(device_id(1))
        assert result is not None
        assert record is not None
        return result.appraised_at, record.last_seen

    assert asyncio.run(latest()) == (times[-1], times[-1])


def test_stream_leases_are_one_above_the_last_on_any_replica(
    replicas: tuple[PgRepositories, PgRepositories],
) -> None:
    a, b = replicas
    tokens = _gather(
        *((a if n % 2 else b).streams().claim(device_id(1), f"r{n}") for n in range(20))
    )
    assert sorted(tokens) == list(range(1, 21))
    # The older stream's decision is refused once a newer one took the lease over.
    newest = max(tokens)
    stale = dataclasses.replace(decision(1), lease=newest - 1)
    fresh = dataclasses.replace(decision(1), lease=newest)
    refused, stored = _gather(a.trust.record(stale), b.trust.record(fresh))
    assert type(refused).__name__ == "Superseded"
    assert stored == []
