"""The metrics' devices gauge reads the fleet with one grouped query (``fleet_counts``), on
SQLite and PostgreSQL: devices by zone, state and tier, a result past its expiry and a
device never appraised counted as tier none."""

from __future__ import annotations

import datetime

from devtrust.core.tier import Tier
from devtrust.verifier.records import DeviceState
from devtrust.verifier.storage import open_repositories
from tests.db import NOW, decision, device, device_id, run

pytest_plugins = ["tests.pg"]


def test_fleet_counts_group_devices_by_zone_state_and_tier(database: str) -> None:
    later = NOW + datetime.timedelta(minutes=1)

    async def scenario() -> tuple[set[tuple[str, str, str, int]], set[tuple[str, str, str, int]]]:
        repos = await open_repositories(database)
        try:
            zones = ["a", "a", "a", "b", "b", ""]
            for n, zone in enumerate(zones, 1):
                await repos.devices.save(device(n, zone=zone), now=NOW, event="enrolled:enrolled")
            await repos.trust.record(decision(1, at=NOW))
            await repos.trust.record(decision(2, at=NOW))
            await repos.trust.record(decision(3, at=NOW, tier=Tier.CONTRAINDICATED))
            # Stale one minute after NOW: counted as tier none from then on.
            await repos.trust.record(decision(4, at=NOW, staleness=datetime.timedelta(seconds=30)))
            await repos.devices.set_state(
                device_id(5), DeviceState.REVOKED, now=NOW, event="revoked"
            )
            # device 6: never appraised
            now = {
                (c.zone, c.state, c.tier, c.devices) for c in await repos.devices.fleet_counts(NOW)
            }
            after = {
                (c.zone, c.state, c.tier, c.devices)
                for c in await repos.devices.fleet_counts(later)
            }
            return now, after
        finally:
            await repos.close()

    now, after = run(scenario)
    assert now == {
        ("a", "enrolled", "affirming", 2),
        ("a", "enrolled", "contraindicated", 1),
        ("b", "enrolled", "affirming", 1),
        ("b", "revoked", "none", 1),
        ("", "enrolled", "none", 1),
    }
    assert ("b", "enrolled", "none", 1) in after  # device 4's result expired
    assert ("b", "enrolled", "affirming", 1) not in after
