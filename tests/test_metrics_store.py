"""The metrics' devices gauge reads the fleet with one grouped query (``fleet_counts``), on
SQLite and PostgreSQL: devices by zone, state and tier, a result past its expiry and a
device never appraised counted as tier none; the compliant devices of each zone, by the
zone's minimum tier (certificates.min_tier, zone_min_tier), from the same reading."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from prometheus_client import CollectorRegistry

from devtrust.core.tier import Tier
from devtrust.verifier.config import CertificatesConfig
from devtrust.verifier.decision import DeviceChanged, Sinks
from devtrust.verifier.errors import Superseded
from devtrust.verifier.metrics import MetricsSink, VerifierMetrics
from devtrust.verifier.records import DeviceState
from devtrust.verifier.settings import CertificateSettings
from devtrust.verifier.storage import open_repositories
from devtrust.verifier.storage.sink import StoreSink
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


def test_compliant_devices_meet_their_zones_minimum(database: str) -> None:
    """Compliant = enrolled, result unexpired, tier meets the zone's minimum (the report's
    definition): zone a takes contraindicated, the others the default affirming; a warning
    device is compliant in a zone whose minimum is warning, not in one of affirming."""
    later = NOW + datetime.timedelta(minutes=1)
    config = CertificatesConfig(
        min_tier="affirming", zone_min_tier={"a": "contraindicated", "w": "warning"}
    )
    minimum = CertificateSettings(
        trust_domain="devtrust.test",
        device_lifetime=datetime.timedelta(minutes=15),
        channel_lifetime=datetime.timedelta(days=1),
        min_tier=config.min,
        zone_min_tier=config.zone_min,
    ).min_tier_for

    async def scenario() -> tuple[dict[str, float | None], dict[str, float | None]]:
        repos = await open_repositories(database)
        registry = CollectorRegistry()
        metrics = VerifierMetrics(registry)

        def compliant() -> dict[str, float | None]:
            return {
                zone: registry.get_sample_value("devtrust_devices_compliant", {"zone": zone})
                for zone in ("a", "b", "w", "x", "")
            }

        try:
            for n, zone in enumerate(["a", "a", "a", "b", "b", "", "w", "x"], 1):
                await repos.devices.save(device(n, zone=zone), now=NOW, event="enrolled:enrolled")
            await repos.trust.record(decision(1, at=NOW))
            await repos.trust.record(decision(2, at=NOW, tier=Tier.WARNING))
            await repos.trust.record(decision(3, at=NOW, tier=Tier.CONTRAINDICATED))
            await repos.trust.record(decision(4, at=NOW, staleness=datetime.timedelta(seconds=30)))
            await repos.devices.set_state(
                device_id(5), DeviceState.REVOKED, now=NOW, event="revoked"
            )
            await repos.trust.record(decision(5, at=NOW))  # revoked: in no zone's figures
            await repos.trust.record(decision(7, at=NOW, tier=Tier.WARNING))
            await repos.trust.record(decision(8, at=NOW, tier=Tier.WARNING))
            metrics.show_fleet(await repos.devices.fleet_counts(NOW), 1.0, minimum=minimum)
            now = compliant()
            metrics.show_fleet(await repos.devices.fleet_counts(later), 2.0, minimum=minimum)
            return now, compliant()
        finally:
            await repos.close()

    now, after = run(scenario)
    # a: all three meet contraindicated; b: device 4 (device 5 is revoked); "": never
    # appraised; w: warning meets warning; x: warning is below affirming.
    assert now == {"a": 3, "b": 1, "w": 1, "x": 0, "": 0}
    assert after == {"a": 3, "b": 0, "w": 1, "x": 0, "": 0}  # device 4's result expired


def test_a_refused_decision_is_not_counted(database: str) -> None:
    """The metrics sink sits after the store: a decision the store refuses (Superseded: a
    newer stream holds the device's lease; DeviceChanged: the device is not as assumed) is
    neither an appraisal nor a detection; the one stored is counted once (review L12)."""

    async def scenario() -> CollectorRegistry:
        repos = await open_repositories(database)
        registry = CollectorRegistry()
        sinks = Sinks([StoreSink(repos), MetricsSink(VerifierMetrics(registry))])
        try:
            record = device(1)
            await repos.devices.save(record, now=NOW, event="enrolled:enrolled")
            streams = repos.streams()
            old = await streams.claim(device_id(1), "test/stream-1")
            new = await streams.claim(device_id(1), "test/stream-2")
            timed = dataclasses.replace(decision(1), received=0.0, posture_noted=0.0)
            with pytest.raises(Superseded):
                await sinks.publish(dataclasses.replace(timed, lease=old))
            moved = dataclasses.replace(record, zone="elsewhere")
            with pytest.raises(DeviceChanged):
                await sinks.publish(dataclasses.replace(timed, lease=new, assumed=moved))
            affirming = {"zone": "", "tier": "affirming"}
            assert registry.get_sample_value("devtrust_appraisals_total", affirming) is None
            assert registry.get_sample_value("devtrust_detection_seconds_count") == 0
            await sinks.publish(dataclasses.replace(timed, lease=new, assumed=record))
            return registry
        finally:
            await repos.close()

    registry = run(scenario)
    labels = {"zone": "", "tier": "affirming"}
    assert registry.get_sample_value("devtrust_appraisals_total", labels) == 1
    assert registry.get_sample_value("devtrust_appraisal_seconds_count") == 1
    assert registry.get_sample_value("devtrust_detection_seconds_count") == 1
