"""The storage package (issue 9, item 5) on real SQLite files: group commit counted by the
writer's commit hook (no timing), a failing decision that loses no other, filters and paging
done by SQL, and the forward-only rules. The migrations: test_storage_migrations.py."""

from __future__ import annotations

import asyncio
import datetime
import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from devtrust.core.tier import Tier
from devtrust.verifier import measured_boot
from devtrust.verifier.measured_boot import LogPart
from devtrust.verifier.records import DeviceRecord, DeviceState, TpmState
from devtrust.verifier.storage import (
    DeviceQuery,
    Repositories,
    StoreSink,
    codec,
    open_repositories,
    open_sqlite,
)
from devtrust.verifier.storage.sqlite_engine import Writer
from devtrust.verifier.tpm.clock import ClockState
from devtrust.verifier.trust import TrustResult
from tests import eventlogs
from tests.db import NOW, decision, device, device_id, run

CLOCK = ClockState(clock=1000, reset_count=1, restart_count=0, firmware_version=7)

# The fixtures `database` (each test on SQLite and PostgreSQL) and `pg_url`.
pytest_plugins = ["tests.pg"]


async def with_devices(path: Path | str, count: int) -> Repositories:
    repos = await open_repositories(path)
    for n in range(count):
        await repos.devices.save(device(n), now=NOW, event="enrolled:enrolled")
    return repos


# --- group commit ------------------------------------------------------------------------


class Gate:
    """A commit hook that holds the writer after its first commit until released, so that
    writes queue meanwhile: batches without timing."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, size: int) -> None:
        self.sizes.append(size)
        if len(self.sizes) == 1:
            self.held.set()
            assert self.release.wait(30)


async def _queued_behind_gate(
    gate: Gate, first: Awaitable[object], rest: list[Awaitable[object]]
) -> list[object]:
    """Run ``first`` until the writer holds after committing it, queue ``rest``, release."""
    head = asyncio.ensure_future(first)
    assert await asyncio.to_thread(gate.held.wait, 30)
    tasks = [asyncio.ensure_future(w) for w in rest]
    for _ in range(3):
        await asyncio.sleep(0)  # every task queues its write
    gate.release.set()
    await head
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_concurrent_decisions_commit_in_one_transaction(tmp_path: Path) -> None:
    gate = Gate()
    count = 100

    async def scenario() -> tuple[list[object], list[bool]]:
        await _close_after(with_devices(tmp_path / "v.db", count + 1))
        repos = await open_sqlite(tmp_path / "v.db", on_commit=gate)
        try:
            sink = StoreSink(repos)
            outcomes = await _queued_behind_gate(
                gate,
                sink.publish(decision(count)),
                [sink.publish(decision(n)) for n in range(count)],
            )
            stored = [await repos.trust.latest(device_id(n)) is not None for n in range(count)]
            return outcomes, stored
        finally:
            await repos.close()

    outcomes, stored = run(scenario)
    assert outcomes == [None] * count
    assert stored == [True] * count
    # The first alone, then every decision queued meanwhile in one transaction.
    assert gate.sizes == [1, count]


def test_a_failing_decision_in_a_batch_loses_no_other(tmp_path: Path) -> None:
    gate = Gate()
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    whole = measured_boot.extend(None, 0, data, max_bytes=1 << 24, max_events=100_000)
    # A part that does not end the log state: refused by the trust repository.
    wrong = TpmState(clock=CLOCK, log=whole, pcrs={}, log_part=LogPart(0, data[:10]))
    good = TpmState(clock=CLOCK, log=whole, pcrs={}, log_part=LogPart(0, data))

    async def scenario() -> tuple[list[object], list[int], dict[str, int], list[bool], int]:
        await _close_after(with_devices(tmp_path / "v.db", 6))
        repos = await open_sqlite(tmp_path / "v.db", on_commit=gate)
        try:
            audited = (await repos.counts())["audit"]  # the enrollments (and their chains')
            outcomes = await _queued_behind_gate(
                gate,
                repos.trust.record(decision(5)),
                [
                    repos.trust.record(decision(0, tpm=good)),
                    repos.trust.record(decision(1, tpm=wrong)),
                    repos.trust.record(decision(2)),
                    repos.trust.record(decision(99)),  # no such device
                    repos.trust.record(decision(3, tpm=good)),
                ],
            )
            stored = [await repos.trust.latest(device_id(n)) is not None for n in range(4)]
            return outcomes, list(gate.sizes), await repos.counts(), stored, audited
        finally:
            await repos.close()

    outcomes, sizes, counts, stored, audited = run(scenario)
    assert outcomes[0] == []  # stored; nothing revoked with it
    assert isinstance(outcomes[1], ValueError)
    assert "does not end the log state's" in str(outcomes[1])
    assert outcomes[2] == []
    assert isinstance(outcomes[3], sqlite3.IntegrityError)  # the trust row's device
    assert outcomes[4] == []
    assert sizes == [1, 3]  # the three good ones in one transaction
    assert stored == [True, False, True, True]
    assert counts["tpm_state"] == 2
    assert counts["event_log_parts"] == 2
    assert counts["audit"] == audited + 4  # the good decisions only


def test_a_write_that_ends_the_transaction_fails_alone(tmp_path: Path) -> None:
    """Some SQLite errors (disk full, I/O) roll back the whole transaction: the writes
    before the failing one are run again in a new one, not lost."""
    db = sqlite3.connect(tmp_path / "w.db", check_same_thread=False, isolation_level=None)
    db.execute("CREATE TABLE t (x INTEGER)")
    sizes: list[int] = []
    hold = threading.Event()
    writer = Writer(db, on_commit=sizes.append)

    def insert(x: int) -> Callable[[sqlite3.Connection], int]:
        def work(conn: sqlite3.Connection) -> int:
            hold.wait(30)
            conn.execute("INSERT INTO t VALUES (?)", (x,))
            return x

        return work

    def ends_transaction(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")

    first = writer.submit(insert(1))
    failing = writer.submit(ends_transaction)
    last = writer.submit(insert(2))
    hold.set()
    assert first.result(30) == 1
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        failing.result(30)
    assert last.result(30) == 2
    writer.close()
    with sqlite3.connect(tmp_path / "w.db") as check:
        assert sorted(r[0] for r in check.execute("SELECT x FROM t")) == [1, 2]
    check.close()
    assert sum(sizes) == 2


def test_a_write_cancelled_before_the_writer_took_it_is_not_written(tmp_path: Path) -> None:
    gate = Gate()

    async def scenario() -> tuple[bool, object]:
        await _close_after(with_devices(tmp_path / "v.db", 2))
        repos = await open_sqlite(tmp_path / "v.db", on_commit=gate)
        try:
            head = asyncio.ensure_future(repos.trust.record(decision(0)))
            assert await asyncio.to_thread(gate.held.wait, 30)
            late = asyncio.ensure_future(repos.trust.record(decision(1)))
            await asyncio.sleep(0)
            late.cancel()
            for _ in range(3):
                await asyncio.sleep(0)  # the cancellation reaches the queued write
            gate.release.set()
            await head
            done = await asyncio.gather(late, return_exceptions=True)
            await repos.tokens.add("cd" * 32, now=NOW, expires_at=NOW)  # the writer goes on
            return isinstance(done[0], asyncio.CancelledError), await repos.trust.latest(
                device_id(1)
            )
        finally:
            await repos.close()

    assert run(scenario) == (True, None)


def test_reads_and_writes_run_off_the_event_loop(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, str, str]:
        repos = await open_sqlite(tmp_path / "v.db")
        engine = repos._engine  # where the work runs
        try:
            return (
                threading.current_thread().name,
                await engine.read(lambda db: threading.current_thread().name),
                await engine.write(lambda db: threading.current_thread().name),
            )
        finally:
            await repos.close()

    loop_thread, reader, writer = run(scenario)
    assert reader.startswith("sqlite-read")
    assert writer == "sqlite-writer"
    assert loop_thread not in (reader, writer)


def test_read_only_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    run(lambda: _close_after(with_devices(path, 1)))
    before = sorted(p.name for p in tmp_path.iterdir())

    async def scenario() -> DeviceRecord | None:
        repos = await open_sqlite(path, read_only=True)
        try:
            with pytest.raises(ValueError, match="is open read-only: nothing is written"):
                await repos.devices.save(device(2), now=NOW, event="enrolled:enrolled")
            return await repos.devices.get(device_id(0))
        finally:
            await repos.close()

    assert run(scenario) == device(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


async def _close_after(opening: Awaitable[Repositories]) -> None:
    await (await opening).close()


# --- filters and paging -------------------------------------------------------------------

FLEET = {
    # n: (zone, labels, tier of its latest result or None, appraised at, staleness)
    0: ("lab", {"rack": "1", "gpu": "h100"}, Tier.AFFIRMING, NOW, 10),
    1: ("lab", {"rack": "2", "gpu": "h100"}, Tier.WARNING, NOW, 10),
    2: ("prod", {"rack": "1"}, Tier.AFFIRMING, NOW - datetime.timedelta(minutes=20), 10),
    3: ("prod", {"rack": "1", "gpu": "h100"}, Tier.CONTRAINDICATED, NOW, 10),
    4: ("prod", {}, None, NOW, 10),
    5: ("lab", {"gpu": "a100"}, Tier.AFFIRMING, NOW - datetime.timedelta(minutes=2), 1),
    6: ("", {}, Tier.NONE, NOW, 10),
}


async def _fleet(database: str, readers: int = 4) -> Repositories:
    repos = await (
        open_sqlite(Path(database), readers=readers)
        if not database.startswith("postgresql:")
        else open_repositories(database)
    )
    for n, (zone, labels, tier, at, minutes) in FLEET.items():
        await repos.devices.save(
            device(n, zone=zone, labels=labels), now=NOW, event="enrolled:enrolled"
        )
        if tier is not None:
            staleness = datetime.timedelta(minutes=minutes)
            await repos.trust.record(decision(n, at=at, tier=tier, staleness=staleness))
    return repos


FILTERS = {
    "everything": (DeviceQuery(), [0, 1, 2, 3, 4, 5, 6]),
    "zone": (DeviceQuery(zone="prod"), [2, 3, 4]),
    "label": (DeviceQuery(label=("gpu", "h100")), [0, 1, 3]),
    "labels, all of them": (DeviceQuery(labels=(("gpu", "h100"), ("rack", "1"))), [0, 3]),
    "label and zone": (DeviceQuery(zone="lab", label=("rack", "1")), [0]),
    "label value is matched whole": (DeviceQuery(label=("gpu", "h10")), []),
    "stored tier": (DeviceQuery(tier=Tier.AFFIRMING), [0, 2, 5]),
    "stored tier none includes never appraised": (DeviceQuery(tier=Tier.NONE), [4, 6]),
    # Read at NOW, the results past their bound (2: 10 min after 20 min ago; 5: 1 min
    # after 2 min ago) are tier none, as the Query service shows them.
    "tier at now": (DeviceQuery(tier=Tier.AFFIRMING, now=NOW), [0]),
    "tier none at now": (DeviceQuery(tier=Tier.NONE, now=NOW), [2, 4, 5, 6]),
    "tier and zone": (DeviceQuery(tier=Tier.CONTRAINDICATED, zone="prod"), [3]),
    "stale at now": (DeviceQuery(stale_at=NOW), [2, 4, 5]),
    "last seen before": (
        DeviceQuery(stale_before=NOW - datetime.timedelta(minutes=1)),
        [2, 4, 5],
    ),
    "last seen before, zone": (
        DeviceQuery(zone="lab", stale_before=NOW - datetime.timedelta(minutes=5)),
        [],
    ),
    "after": (DeviceQuery(after=device_id(4)), [5, 6]),
    "after and limit": (DeviceQuery(after=device_id(0), limit=2), [1, 2]),
    "filter and limit": (DeviceQuery(zone="lab", limit=2), [0, 1]),
}


def test_device_filters_and_paging_are_done_in_sql(database: str) -> None:
    queries: list[str] = []
    traced = not database.startswith("postgresql:")  # SQLite traces its statements

    async def scenario() -> dict[str, list[int]]:
        repos = await _fleet(database, readers=1)  # one connection to trace
        try:
            engine = repos.engine  # type: ignore[attr-defined]  # to count statements
            out = {}
            for name, (query, _) in FILTERS.items():
                if traced:
                    await engine.read(lambda db: db.set_trace_callback(queries.append))
                queries.clear()
                out[name] = [int(r.device_id, 16) for r in await repos.devices.list(query)]
                if traced:
                    # One statement per page: no query per device, no filter in Python.
                    assert [q for q in queries if q.startswith("SELECT")] != []
                    assert len([q for q in queries if q.startswith("SELECT")]) <= 1, queries
            return out
        finally:
            await repos.close()

    found = run(scenario)
    assert found == {name: want for name, (_, want) in FILTERS.items()}


def test_paging_visits_every_match_once(database: str) -> None:
    async def scenario() -> list[list[int]]:
        repos = await _fleet(database)
        try:
            pages: list[list[int]] = []
            after = ""
            while True:
                page = await repos.devices.list(DeviceQuery(zone="lab", after=after, limit=1))
                if not page:
                    return pages
                pages.append([int(r.device_id, 16) for r in page])
                after = page[-1].device_id
        finally:
            await repos.close()

    assert run(scenario) == [[0], [1], [5]]


def test_list_with_trust_gives_each_device_its_latest_result(database: str) -> None:
    async def scenario() -> list[tuple[int, Tier | None]]:
        repos = await _fleet(database)
        try:
            views = await repos.devices.list_with_trust(DeviceQuery(zone="prod"))
            return [
                (int(v.record.device_id, 16), v.result.tier if v.result else None) for v in views
            ]
        finally:
            await repos.close()

    assert run(scenario) == [(2, Tier.AFFIRMING), (3, Tier.CONTRAINDICATED), (4, None)]


def test_a_query_page_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"DeviceQuery\.limit 0: give 1 to 1000"):
        DeviceQuery(limit=0)
    with pytest.raises(ValueError, match=r"DeviceQuery\.limit 1001"):
        DeviceQuery(limit=1001)


# --- forward only, audit ------------------------------------------------------------------


def test_last_seen_and_trust_only_move_forward(database: str) -> None:
    later = NOW + datetime.timedelta(seconds=30)

    async def scenario() -> tuple[DeviceRecord | None, TrustResult | None, list[str]]:
        repos = await with_devices(database, 1)
        try:
            await repos.trust.record(decision(0, at=later, tier=Tier.WARNING))
            await repos.trust.record(decision(0, at=NOW, tier=Tier.AFFIRMING))  # late
            history = await repos.audit.history(device_id(0))
            return (
                await repos.devices.get(device_id(0)),
                await repos.trust.latest(device_id(0)),
                [f"{e.event}:{e.tier.label if e.tier else '-'}" for e in history],
            )
        finally:
            await repos.close()

    record, latest, history = run(scenario)
    assert record is not None
    assert record.last_seen == later
    assert latest is not None
    assert latest.tier is Tier.WARNING
    # The audit trail keeps both, newest first.
    assert history == ["appraisal:affirming", "appraisal:warning", "enrolled:enrolled:-"]


def test_audit_history_is_the_device_own_newest_first_and_limited(database: str) -> None:
    async def scenario() -> tuple[list[str], list[dict[str, object]]]:
        repos = await with_devices(database, 2)
        try:
            await repos.devices.set_assignment(
                device_id(0), zone="lab", labels={"a": "b"}, now=NOW, event="assigned:operator"
            )
            await repos.devices.set_state(
                device_id(0), DeviceState.REVOKED, now=NOW, event="revoked"
            )
            entries = await repos.audit.history(device_id(0), limit=2)
            return [e.event for e in entries], [e.detail for e in entries]
        finally:
            await repos.close()

    events, details = run(scenario)
    assert events == ["revoked", "assigned:operator"]
    assert details == [
        {"state": "revoked"},
        {"zone": "lab", "labels": {"a": "b"}, "was": {"zone": "", "labels": {}}},
    ]


def test_codec_round_trips_what_it_stores() -> None:
    result = decision(1, tier=Tier.WARNING).result
    assert codec.result_from_json(codec.result_to_json(result)) == result
    rec = device(3, zone="z", labels={"k": "v"})
    assert codec.record_from_json(codec.record_to_json(rec)) == rec
    assert json.loads(codec.record_to_json(rec))["ek_public"] == b"ekpub".hex()
