"""The event log stored append-only (issue 7, item 7): each accepted part appended once, a new
log after a reboot replacing the old parts, the replay state rebuilt from the parts when a
stream opens. Real SQLite files."""

from __future__ import annotations

import dataclasses
import datetime
import sqlite3
from pathlib import Path

import pytest

from devtrust.verifier import measured_boot
from devtrust.verifier.measured_boot import LogPart
from devtrust.verifier.records import DeviceRecord, DeviceState, TpmState
from devtrust.verifier.store import Store
from devtrust.verifier.tpm import eventlog as ev
from devtrust.verifier.tpm.clock import ClockState
from devtrust.verifier.trust import Claim, TrustResult
from tests import eventlogs
from tests.eventlogs import agile_event

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
DEVICE = "d" * 64
BIG = {"max_bytes": 1 << 24, "max_events": 100_000}
CLOCK = ClockState(clock=1000, reset_count=1, restart_count=0, firmware_version=7)


def _store(path: Path) -> Store:
    store = Store(path)
    if store.get_device(DEVICE) is None:
        store.save_device(
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
            event="enrolled",
        )
    return store


def _record(store: Store, log: measured_boot.LogState | None, part: LogPart | None) -> None:
    result = TrustResult(
        device_id=DEVICE,
        claims={Claim.INSTANCE_IDENTITY: 2},
        findings=(),
        appraised_at=NOW,
        expires_at=NOW + datetime.timedelta(minutes=5),
    )
    tpm = TpmState(clock=CLOCK, log=log, pcrs={"sha256": {7: "00" * 32}}, log_part=part)
    store.record_appraisal(result, certificate=None, tpm=tpm)


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
    store = _store(path)
    state = None
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        state = measured_boot.extend(state, start, data[start:end], **BIG)
        _record(store, state, LogPart(start, data[start:end]))
    # An appraisal with no new part appends nothing.
    _record(store, state, LogPart(len(data), b""))
    _record(store, state, None)
    store.close()
    assert _parts(path) == [
        (0, cuts[0]),
        (cuts[0], cuts[1] - cuts[0]),
        (cuts[1], len(data) - cuts[1]),
    ]
    with sqlite3.connect(path) as db:  # the row keeps metadata, not the log
        [(blob, meta)] = db.execute("SELECT log_data, log_state FROM tpm_state").fetchall()
    assert blob == b""
    assert len(meta) < 200
    store = _store(path)
    try:
        tpm = store.tpm_state(DEVICE)
        assert tpm is not None
        assert tpm.clock == CLOCK
        assert state is not None
        _same(tpm.log, state)
        _same(tpm.log, measured_boot.extend(None, 0, data, **BIG))
        assert store.event_log(DEVICE) == data
    finally:
        store.close()


def test_a_new_log_replaces_the_older_parts(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    data, cuts = _log_in_parts()
    store = _store(path)
    first = measured_boot.extend(None, 0, data[: cuts[0]], **BIG)
    _record(store, first, LogPart(0, data[: cuts[0]]))
    second = measured_boot.extend(first, cuts[0], data[cuts[0] :], **BIG)
    _record(store, second, LogPart(cuts[0], data[cuts[0] :]))
    rebooted = eventlogs.agile_log([(0, ev.EV_SEPARATOR, b"\x00\x00\x00\x00")])
    fresh = measured_boot.extend(second, 0, rebooted, **BIG)
    _record(store, fresh, LogPart(0, rebooted))
    assert _parts(path) == [(0, len(rebooted))]
    tpm = store.tpm_state(DEVICE)
    assert tpm is not None
    _same(tpm.log, fresh)
    assert store.event_log(DEVICE) == rebooted
    # A dropped log (a reboot whose log has not come yet) drops its parts.
    _record(store, None, None)
    assert _parts(path) == []
    tpm = store.tpm_state(DEVICE)
    assert tpm is not None
    assert tpm.log is None
    store.close()


def test_parts_that_do_not_make_up_the_recorded_log_give_no_log(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    data, cuts = _log_in_parts()
    store = _store(path)
    first = measured_boot.extend(None, 0, data[: cuts[0]], **BIG)
    _record(store, first, LogPart(0, data[: cuts[0]]))
    whole = measured_boot.extend(first, cuts[0], data[cuts[0] :], **BIG)
    _record(store, whole, None)  # a part accepted but not stored: the row says more
    tpm = store.tpm_state(DEVICE)
    assert tpm is not None
    assert tpm.log is None  # the verifier asks for the whole log again
    store.close()


def test_a_row_from_before_the_parts_table_gives_no_log(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    _store(path).close()
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
    store = _store(path)
    tpm = store.tpm_state(DEVICE)
    assert tpm is not None
    assert tpm.log is None
    store.close()


def test_a_part_that_does_not_end_the_log_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path / "v.db")
    data, cuts = _log_in_parts()
    state = measured_boot.extend(None, 0, data, **BIG)
    with pytest.raises(ValueError, match="does not end"):
        _record(store, state, LogPart(0, data[: cuts[0]]))
    assert store.event_log(DEVICE) == b""
    store.close()


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
    store = _store(tmp_path / "v.db")

    def result(at: datetime.datetime, value: int) -> TrustResult:
        return TrustResult(
            device_id=DEVICE,
            claims={Claim.INSTANCE_IDENTITY: value},
            findings=(),
            appraised_at=at,
            expires_at=at + datetime.timedelta(minutes=5),
        )

    newer, older = NOW + datetime.timedelta(seconds=1, microseconds=5), NOW
    store.record_appraisal(result(newer, 99), certificate=None)
    store.record_appraisal(result(older, 2), certificate=None)
    latest = store.latest_result(DEVICE)
    assert latest is not None
    assert latest.appraised_at == newer
    assert latest.claims[Claim.INSTANCE_IDENTITY] == 99
    assert store.counts()["audit"] == 3  # enrollment and both appraisals


def test_a_new_stream_reads_the_tpm_state_without_replaying_the_log(tmp_path: Path) -> None:
    store = _store(tmp_path / "v.db")
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    state = measured_boot.extend(None, 0, data, **BIG)
    _record(store, state, LogPart(0, data))
    light = store.tpm_state(DEVICE, with_log=False)
    full = store.tpm_state(DEVICE)
    assert light is not None
    assert full is not None
    assert light.log is None
    assert light.clock == full.clock == CLOCK
    assert full.log is not None
    assert full.log.offset == len(data)


def test_a_late_appraisal_changes_neither_the_tpm_state_nor_the_log(tmp_path: Path) -> None:
    store = _store(tmp_path / "v.db")
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    newer_state = measured_boot.extend(None, 0, data, **BIG)
    later_clock = dataclasses.replace(CLOCK, clock=CLOCK.clock + 5000)

    def record(
        at: datetime.datetime, clock: ClockState, log: measured_boot.LogState | None
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
        store.record_appraisal(result, certificate=None, tpm=tpm)

    record(NOW + datetime.timedelta(seconds=10), later_clock, newer_state)
    record(NOW, CLOCK, None)  # a replaced stream's appraisal, finishing late, without a log
    state = store.tpm_state(DEVICE)
    assert state is not None
    assert state.clock == later_clock
    assert store.event_log(DEVICE) == data
