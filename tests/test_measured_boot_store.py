"""The event log stored append-only (issue 7, item 7): each accepted part appended once, a new
log after a reboot replacing the old parts, the replay state rebuilt from the parts when a
stream opens. Real SQLite files."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from devtrust.core.ids import DeviceId
from devtrust.verifier import measured_boot
from devtrust.verifier.decision import Decision
from devtrust.verifier.measured_boot import LogPart
from devtrust.verifier.records import DeviceRecord, DeviceState, TpmState
from devtrust.verifier.storage import SqliteRepositories, open_sqlite
from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.clock import ClockState
from devtrust.verifier.trust import Claim, TrustResult
from tests import eventlogs
from tests.eventlogs import agile_event

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
DEVICE = DeviceId("d" * 64)
BIG = {"max_bytes": 1 << 24, "max_events": 100_000}
CLOCK = ClockState(clock=1000, reset_count=1, restart_count=0, firmware_version=7)
T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await scenario()

    return asyncio.run(main())


async def _store(path: Path) -> SqliteRepositories:
    store = await open_sqlite(path)
    if await store.devices.get(DEVICE) is None:
        await store.devices.save(
            DeviceRecord(
                device_id=DEVICE,
                state=DeviceState.ENROLLED,
                ek_certificate=b"ek",
                ek_public=b"ekpub",
                ak_public=b"akpub",
                ak_name="00",
                host={},
                enrolled_at=NOW,
            ),
            now=NOW,
            event="enrolled:enrolled",
        )
    return store


def _decision(result: TrustResult, tpm: TpmState | None = None) -> Decision:
    return Decision(
        device_id=result.device_id,
        zone="",
        result=result,
        previous_tier=None,
        certificate=None,
        withheld="test",
        tpm=tpm,
        rebooted=False,
    )


async def _record(
    store: SqliteRepositories, log: measured_boot.LogState | None, part: LogPart | None
) -> None:
    result = TrustResult(
        device_id=DEVICE,
        claims={Claim.INSTANCE_IDENTITY: 2},
        findings=(),
        appraised_at=NOW,
        expires_at=NOW + datetime.timedelta(minutes=5),
    )
    tpm = TpmState(clock=CLOCK, log=log, pcrs={"sha256": {7: "00" * 32}}, log_part=part)
    await store.trust.record(_decision(result, tpm))


def _parts(path: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT part_offset, length(data) FROM event_log_parts WHERE device_id = ? "
            "ORDER BY part_offset",
            (DEVICE,),
        ).fetchall()
    return [(int(o), int(n)) for o, n in rows]


def _same(a: measured_boot.LogState | None, b: measured_boot.LogState) -> None:
    assert a is not None
    every = frozenset(range(24))
    assert (a.banks, a.replay, a.offset, a.event_count) == (
        b.banks,
        b.replay,
        b.offset,
        b.event_count,
    )
    assert list(a.contributions()) == list(b.contributions())
    assert list(a.mismatches()) == list(b.mismatches())
    assert dataclasses.asdict(measured_boot.facts_of(a, every)) == dataclasses.asdict(
        measured_boot.facts_of(b, every)
    )


def _log_in_parts() -> tuple[bytes, list[int]]:
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    events = ev.parse(data).events
    return data, [events[3].offset, events[6].offset]


def test_parts_appended_and_rebuilt_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    data, cuts = _log_in_parts()

    async def write() -> measured_boot.LogState | None:
        store = await _store(path)
        state = None
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            state = measured_boot.extend(state, start, data[start:end], **BIG)
            await _record(store, state, LogPart(start, data[start:end]))
        # An appraisal with no new part appends nothing.
        await _record(store, state, LogPart(len(data), b""))
        await _record(store, state, None)
        await store.close()
        return state

    state = run(write)
    assert _parts(path) == [
        (0, cuts[0]),
        (cuts[0], cuts[1] - cuts[0]),
        (cuts[1], len(data) - cuts[1]),
    ]
    with sqlite3.connect(path) as db:  # the row keeps metadata, not the log
        [(blob, meta)] = db.execute("SELECT log_data, log_state FROM tpm_state").fetchall()
    assert blob == b""
    assert len(meta) < 200

    async def reopen() -> None:
        store = await _store(path)
        try:
            tpm = await store.trust.tpm_state(DEVICE)
            assert tpm is not None
            assert tpm.clock == CLOCK
            assert state is not None
            _same(tpm.log, state)
            _same(tpm.log, measured_boot.extend(None, 0, data, **BIG))
            assert await store.trust.event_log(DEVICE) == data
        finally:
            await store.close()

    run(reopen)


def test_a_new_log_replaces_the_older_parts(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    data, cuts = _log_in_parts()

    async def scenario() -> None:
        store = await _store(path)
        first = measured_boot.extend(None, 0, data[: cuts[0]], **BIG)
        await _record(store, first, LogPart(0, data[: cuts[0]]))
        second = measured_boot.extend(first, cuts[0], data[cuts[0] :], **BIG)
        await _record(store, second, LogPart(cuts[0], data[cuts[0] :]))
        rebooted = eventlogs.agile_log([(0, ev.EV_SEPARATOR, b"\x00\x00\x00\x00")])
        fresh = measured_boot.extend(second, 0, rebooted, **BIG)
        await _record(store, fresh, LogPart(0, rebooted))
        assert _parts(path) == [(0, len(rebooted))]
        tpm = await store.trust.tpm_state(DEVICE)
        assert tpm is not None
        _same(tpm.log, fresh)
        assert await store.trust.event_log(DEVICE) == rebooted
        # A dropped log (a reboot whose log has not come yet) drops its parts.
        await _record(store, None, None)
        assert _parts(path) == []
        tpm = await store.trust.tpm_state(DEVICE)
        assert tpm is not None
        assert tpm.log is None
        await store.close()

    run(scenario)


def test_parts_that_do_not_make_up_the_recorded_log_give_no_log(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    data, cuts = _log_in_parts()

    async def scenario() -> None:
        store = await _store(path)
        first = measured_boot.extend(None, 0, data[: cuts[0]], **BIG)
        await _record(store, first, LogPart(0, data[: cuts[0]]))
        whole = measured_boot.extend(first, cuts[0], data[cuts[0] :], **BIG)
        await _record(store, whole, None)  # a part accepted but not stored: the row says more
        tpm = await store.trust.tpm_state(DEVICE)
        assert tpm is not None
        assert tpm.log is None  # the verifier asks for the whole log again
        await store.close()

    run(scenario)


def test_a_row_from_before_the_parts_table_gives_no_log(tmp_path: Path) -> None:
    path = tmp_path / "v.db"

    async def make() -> None:
        await (await _store(path)).close()

    run(make)
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO tpm_state VALUES (?,?,?,?,?,?)",
            (
                DEVICE,
                '{"clock": 1, "reset_count": 0, "restart_count": 0, "firmware_version": 0}',
                eventlogs.agile_log(eventlogs.SAMPLE),
                '{"banks": {"sha1": 20}, "pcrs": {}, "measured": [], "seen_pcr0": false}',
                "{}",
                NOW.isoformat(),
            ),
        )

    async def scenario() -> None:
        store = await _store(path)
        tpm = await store.trust.tpm_state(DEVICE)
        assert tpm is not None
        assert tpm.log is None
        await store.close()

    run(scenario)


def test_a_part_that_does_not_end_the_log_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await _store(tmp_path / "v.db")
        data, cuts = _log_in_parts()
        state = measured_boot.extend(None, 0, data, **BIG)
        with pytest.raises(ValueError, match="does not end"):
            await _record(store, state, LogPart(0, data[: cuts[0]]))
        assert await store.trust.event_log(DEVICE) == b""
        await store.close()

    run(scenario)


def test_rebuild_replays_parts_through_extend() -> None:
    data, cuts = _log_in_parts()
    parts = [LogPart(s, data[s:e]) for s, e in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    whole = measured_boot.extend(None, 0, data, **BIG)
    rebuilt = measured_boot.rebuild(parts, offset=len(data), event_count=whole.event_count)
    _same(rebuilt, whole)
    assert measured_boot.rebuild(parts[:2], offset=len(data), event_count=whole.event_count) is None
    assert measured_boot.rebuild([parts[0], parts[2]], offset=len(data), event_count=9) is None
    garbage = [LogPart(0, b"\x01" * 40)]
    assert measured_boot.rebuild(garbage, offset=40, event_count=1) is None
    late = agile_event(0, ev.EV_NO_ACTION, b"x", ("sha1", "sha256"))
    assert (
        measured_boot.rebuild(
            [*parts, LogPart(len(data), late)], offset=len(data), event_count=whole.event_count
        )
        is None
    )


def test_an_older_result_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """A replaced stream's appraisal may finish after the new stream's: the trust row keeps
    the newest result (the audit trail has both)."""

    def result(at: datetime.datetime, value: int) -> TrustResult:
        return TrustResult(
            device_id=DEVICE,
            claims={Claim.INSTANCE_IDENTITY: value},
            findings=(),
            appraised_at=at,
            expires_at=at + datetime.timedelta(minutes=5),
        )

    newer, older = NOW + datetime.timedelta(seconds=1, microseconds=5), NOW

    async def scenario() -> None:
        store = await _store(tmp_path / "v.db")
        await store.trust.record(_decision(result(newer, 99)))
        await store.trust.record(_decision(result(older, 2)))
        latest = await store.trust.latest(DEVICE)
        assert latest is not None
        assert latest.appraised_at == newer
        assert latest.claims[Claim.INSTANCE_IDENTITY] == 99
        # enrollment and both appraisals; the device's chain announced on its shard of
        # "chains", and that shard (the database's first) on the root "chains"
        assert (await store.counts())["audit"] == 5
        await store.close()

    run(scenario)


def test_a_new_stream_reads_the_tpm_state_without_replaying_the_log(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await _store(tmp_path / "v.db")
        data = eventlogs.agile_log(eventlogs.SAMPLE)
        state = measured_boot.extend(None, 0, data, **BIG)
        await _record(store, state, LogPart(0, data))
        light = await store.trust.tpm_state(DEVICE, with_log=False)
        full = await store.trust.tpm_state(DEVICE)
        assert light is not None
        assert full is not None
        assert light.log is None
        assert light.clock == full.clock == CLOCK
        assert full.log is not None
        assert full.log.offset == len(data)
        await store.close()

    run(scenario)


def test_a_late_appraisal_changes_neither_the_tpm_state_nor_the_log(tmp_path: Path) -> None:
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    newer_state = measured_boot.extend(None, 0, data, **BIG)
    later_clock = dataclasses.replace(CLOCK, clock=CLOCK.clock + 5000)

    async def record(
        store: SqliteRepositories,
        at: datetime.datetime,
        clock: ClockState,
        log: measured_boot.LogState | None,
    ) -> None:
        result = TrustResult(
            device_id=DEVICE,
            claims={Claim.INSTANCE_IDENTITY: 2},
            findings=(),
            appraised_at=at,
            expires_at=at + datetime.timedelta(minutes=5),
        )
        part = LogPart(0, data) if log is not None else None
        tpm = TpmState(clock=clock, log=log, pcrs={"sha256": {7: "00" * 32}}, log_part=part)
        await store.trust.record(_decision(result, tpm))

    async def scenario() -> None:
        store = await _store(tmp_path / "v.db")
        await record(store, NOW + datetime.timedelta(seconds=10), later_clock, newer_state)
        # A replaced stream's appraisal, finishing late, without a log.
        await record(store, NOW, CLOCK, None)
        state = await store.trust.tpm_state(DEVICE)
        assert state is not None
        assert state.clock == later_clock
        assert await store.trust.event_log(DEVICE) == data
        await store.close()

    run(scenario)
