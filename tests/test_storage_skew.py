"""Trust and TPM state across replicas whose clocks disagree (review M2), on SQLite and
PostgreSQL: a device's stream moves from a replica whose clock runs two minutes ahead to
another; the new stream's results (its lease is newer) replace the old ones although their
appraised_at is earlier. Without a lease (tests, tools) the later time still wins."""

from __future__ import annotations

import datetime
from dataclasses import replace

from devtrust.core.tier import Tier
from devtrust.verifier import measured_boot
from devtrust.verifier.measured_boot import LogPart
from devtrust.verifier.records import TpmState
from devtrust.verifier.storage import open_repositories
from devtrust.verifier.tpm.clock import ClockState
from tests import eventlogs
from tests.db import NOW, decision, device, device_id, run

pytest_plugins = ["tests.pg"]
AHEAD = NOW + datetime.timedelta(minutes=2)


def _tpm(clock: int) -> TpmState:
    data = eventlogs.agile_log(eventlogs.SAMPLE)
    whole = measured_boot.extend(None, 0, data, max_bytes=1 << 24, max_events=100_000)
    state = ClockState(clock=clock, reset_count=1, restart_count=0, firmware_version=7)
    return TpmState(clock=state, log=whole, pcrs={}, log_part=LogPart(0, data))


def test_the_newer_lease_wins_over_a_clock_ahead(database: str) -> None:
    async def scenario() -> tuple[object, object, object, object]:
        repos = await open_repositories(database)
        try:
            await repos.devices.save(device(1), now=NOW, event="enrolled:enrolled")
            streams = repos.streams()
            first = await streams.claim(device_id(1), "replica-a")  # its clock runs ahead
            await repos.trust.record(
                replace(decision(1, at=AHEAD, tier=Tier.AFFIRMING, tpm=_tpm(5000)), lease=first)
            )
            second = await streams.claim(device_id(1), "replica-b")
            await repos.trust.record(
                replace(decision(1, at=NOW, tier=Tier.WARNING, tpm=_tpm(6000)), lease=second)
            )
            leased = await repos.trust.latest(device_id(1))
            tpm = await repos.trust.tpm_state(device_id(1), with_log=False)
            # Without a lease, an earlier time is no newer result.
            await repos.trust.record(decision(1, at=NOW - datetime.timedelta(minutes=1)))
            unleased = await repos.trust.latest(device_id(1))
            return (
                None if leased is None else (leased.appraised_at, leased.tier),
                None if tpm is None else tpm.clock.clock,
                None if unleased is None else unleased.appraised_at,
                second,
            )
        finally:
            await repos.close()

    leased, clock, unleased, second = run(scenario)
    assert second == 2
    assert leased == (NOW, Tier.WARNING)  # before the fix: replica A's (AHEAD, AFFIRMING)
    assert clock == 6000  # before the fix: 5000, a stale TPM clock for the next appraisal
    assert unleased == NOW
