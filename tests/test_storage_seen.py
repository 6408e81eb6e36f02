"""``devices.last_seen`` moves with evidence only (review L6), on SQLite and PostgreSQL: a
decision on an agent's "my TPM does not answer" (finding tpm.unavailable) is stored, but
the device is not counted as seen, so it stays in the operators' stale-devices query."""

from __future__ import annotations

import datetime
from dataclasses import replace

from devtrust.verifier.storage import DeviceQuery, open_repositories
from devtrust.verifier.tpm_unavailable import TpmUnavailableReport, tpm_unavailable_result
from tests.db import NOW, decision, device, device_id, run

pytest_plugins = ["tests.pg"]


def test_a_tpm_unavailable_answer_does_not_count_as_seen(database: str) -> None:
    later = NOW + datetime.timedelta(minutes=10)

    async def scenario() -> tuple[datetime.datetime | None, list[str], str | None]:
        repos = await open_repositories(database)
        try:
            await repos.devices.save(device(1), now=NOW, event="enrolled:enrolled")
            await repos.trust.record(decision(1, at=NOW))  # evidence: seen at NOW
            dead = decision(1, at=later)
            result = tpm_unavailable_result(
                device_id(1),
                TpmUnavailableReport("tpm0: no answer"),
                now=later,
                staleness=datetime.timedelta(minutes=3),
            )
            await repos.trust.record(replace(dead, result=result, seen=False))
            found = await repos.devices.get(device_id(1))
            stale = await repos.devices.list(
                DeviceQuery(stale_before=NOW + datetime.timedelta(minutes=5))
            )
            latest = await repos.trust.latest(device_id(1))
            return (
                None if found is None else found.last_seen,
                [d.device_id for d in stale],
                None if latest is None else latest.findings[0].id,
            )
        finally:
            await repos.close()

    seen, stale, finding = run(scenario)
    assert finding == "tpm.unavailable"  # the decision itself was stored
    assert seen == NOW  # before the fix: ``later``
    assert stale == [device_id(1)]
