"""The Query API's new methods (issue 10, item 4) over real mTLS on a real verifier:

- WatchTrust: a watcher gets the current results, then a device's changed result from a
  real attestation; one that falls a whole queue behind is dropped with RESOURCE_EXHAUSTED
  and never holds up the sink;
- History: a device's audit trail newest first, in pages, each entry with its actor;
- Approve, SetZone, Revoke: verifier/lifecycle.py's transitions, each audited with the
  operator who made it; what the lifecycle refuses is refused;
- the lifecycle itself, case by case, and the `approve` command, which uses it too;
- roles: their order, and the configuration's `operators:` checked when it loads.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import common_pb2, query_pb2, query_pb2_grpc
from devtrust.verifier import lifecycle
from devtrust.verifier.config import EnrollmentConfig
from devtrust.verifier.errors import FailedPrecondition, MalformedInput, ResourceExhausted
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import AuditEvent, DeviceState, Standing
from devtrust.verifier.roles import Role
from devtrust.verifier.watch import QUEUE_SIZE, TrustWatch, WatchFilter
from tests.conftest import SwtpmFactory
from tests.db import NOW, decision, device, device_id
from tests.env import enrolled_agent, first_results, running, verifier_config
from tests.test_authz import credentials
from tests.test_ops_cli import Run, devtrust, profile

OPERATORS = {"otto": "operator", "vera": "viewer"}


def _config(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA) -> Any:
    return replace(verifier_config(workdir, pki, ek_ca), operators=OPERATORS)


def _channel(pki: PkiFiles, port: int, name: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials(pki, "operator", name))


def _audit(database: Path, dev: str) -> list[tuple[str, str, dict[str, Any]]]:
    db = sqlite3.connect(database)
    try:
        rows = db.execute(
            "SELECT event, actor, detail FROM audit WHERE device_id = ? ORDER BY id", (dev,)
        ).fetchall()
    finally:
        db.close()
    return [(event, actor, json.loads(detail)) for event, actor, detail in rows]


# --- WatchTrust ------------------------------------------------------------------------------


def test_a_watcher_gets_the_current_result_then_the_changed_one(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = _config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[Any, Any, Any, int]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
            _channel(pki, verifier.attestation_port, "vera") as channel,
        ):
            query = query_pb2_grpc.QueryStub(channel)
            call = query.WatchTrust(query_pb2.WatchTrustRequest(initial=True), timeout=60)
            initial = await call.read()  # read once subscribed: no change is missed
            elsewhere = query.WatchTrust(
                query_pb2.WatchTrustRequest(zone="elsewhere", initial=True), timeout=60
            )
            marker = await elsewhere.read()
            [result] = await first_results(agent)
            change = await asyncio.wait_for(call.read(), 20)
            call.cancel()
            elsewhere.cancel()
            return initial, marker, change, result.trust.score

    initial, marker, change, score = asyncio.run(scenario())
    assert initial.trust.tier == common_pb2.TIER_NONE  # enrolled, never appraised
    assert initial.end_of_initial
    # A filter nobody matches: the end of the (empty) initial results, and no device.
    assert (marker.device_id, marker.end_of_initial) == ("", True)
    assert change.device_id == initial.device_id
    assert change.trust.tier == common_pb2.TIER_AFFIRMING
    assert change.trust.score == score
    assert change.previous_tier == common_pb2.TIER_UNSPECIFIED  # its first appraisal
    assert not change.end_of_initial


def test_a_slow_watcher_is_dropped_and_holds_up_nothing(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """More changes than a watcher's queue holds, published in one go (the sink never
    waits for a watcher): the watcher's stream ends RESOURCE_EXHAUSTED, saying why."""
    config = _config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[int, grpc.StatusCode, str, float]:
        async with (
            running(config) as verifier,
            _channel(pki, verifier.attestation_port, "vera") as channel,
        ):
            call = query_pb2_grpc.QueryStub(channel).WatchTrust(
                query_pb2.WatchTrustRequest(initial=True), timeout=30
            )
            await call.read()
            started = asyncio.get_running_loop().time()
            for n in range(QUEUE_SIZE + 1):
                await verifier.watch.publish(decision(n + 1))
            took = asyncio.get_running_loop().time() - started
            received = 0
            try:
                while await call.read() is not grpc.aio.EOF:
                    received += 1
            except grpc.aio.AioRpcError as exc:
                return received, exc.code(), exc.details() or "", took
            raise AssertionError("the watch ended without an error")

    received, code, details, took = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"this watch fell {QUEUE_SIZE} changes behind and was dropped" in details
    assert received < QUEUE_SIZE + 1
    assert took < 5.0


def test_the_watch_filters_and_sends_only_changes() -> None:
    async def scenario() -> list[tuple[str, int]]:
        watch = TrustWatch(queue_size=4)
        zoned = watch.subscribe(WatchFilter(zone="z"))
        one = watch.subscribe(WatchFilter(device_id=device_id(1)))
        slow = watch.subscribe(WatchFilter())
        first = decision(1)
        await watch.publish(replace(first, zone="z"))
        await watch.publish(replace(first, zone="z"))  # same tier and score: no change
        await watch.publish(decision(1, tier=Tier.WARNING))
        for n in range(2, 6):
            await watch.publish(decision(n))
        got = []
        for sub, name in ((zoned, "zoned"), (one, "one")):
            while not sub._queue.empty():
                change = await sub.next()
                assert change is not None
                got.append((name, int(change.device_id or "0", 16)))
        with pytest.raises(ResourceExhausted, match="fell 4 changes behind"):
            await slow.next()
        assert watch.watchers == 2  # the slow one is gone
        watch.close()
        assert await zoned.next() is None  # the watch closed: its stream ends
        return got

    assert asyncio.run(scenario()) == [("zoned", 1), ("one", 1), ("one", 1)]


# --- History ---------------------------------------------------------------------------------


def test_history_pages_newest_first_with_actors(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = _config(workdir, pki, endorsement_ca)
    dev = device(3)

    async def scenario() -> tuple[list[Any], Any, Any]:
        async with (
            running(config) as verifier,
            _channel(pki, verifier.attestation_port, "otto") as channel,
        ):
            await verifier.repos.devices.save(dev, now=NOW, event="enrolled:enrolled")
            for minutes in (1, 2, 3):
                at = NOW + datetime.timedelta(minutes=minutes)
                await verifier.repos.trust.record(decision(3, at=at))
            query = query_pb2_grpc.QueryStub(channel)
            await query.SetZone(
                query_pb2.SetZoneRequest(device_id=dev.device_id, zone="management"), timeout=5
            )
            pages = []
            token = ""
            while True:
                page = await query.History(
                    query_pb2.HistoryRequest(
                        device_id=dev.device_id, page_size=2, page_token=token
                    ),
                    timeout=5,
                )
                pages.append(page)
                token = page.next_page_token
                if not token:
                    break
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await query.History(
                    query_pb2.HistoryRequest(device_id=dev.device_id, page_token="x1"), timeout=5
                )
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await query.History(query_pb2.HistoryRequest(device_id="cd" * 32), timeout=5)
            return pages, bad.value, missing.value

    pages, bad, missing = asyncio.run(scenario())
    assert [len(p.entries) for p in pages] == [2, 2, 1]
    entries = [e for p in pages for e in p.entries]
    assert [(e.event, e.actor) for e in entries] == [
        ("assigned:operator", "operator/otto"),
        ("appraisal", "device"),
        ("appraisal", "device"),
        ("appraisal", "device"),
        ("enrolled:enrolled", "device"),  # the enrollment: the device proved its TPM
    ]
    times = [e.at.ToDatetime(tzinfo=datetime.UTC) for e in entries[1:4]]
    assert times == sorted(times, reverse=True)
    assert entries[1].trust.tier == common_pb2.TIER_AFFIRMING
    assert entries[1].detail_json == ""
    moved = json.loads(entries[0].detail_json)
    assert moved == {"zone": "management", "labels": {}, "was": {"zone": "", "labels": {}}}
    assert not entries[0].HasField("trust")
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "HistoryRequest.page_token" in (bad.details() or "")
    assert missing.code() == grpc.StatusCode.NOT_FOUND


# --- Approve, SetZone, Revoke ----------------------------------------------------------------


@dataclass
class Outcomes:
    approved: Any
    moved: Any
    revoked: Any
    refused: dict[str, tuple[str, str]]


def test_approve_set_zone_and_revoke_are_audited_with_the_operator(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    pinned = device(9)
    inventory = workdir / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({pinned.device_id: {"zone": "data-processing"}}))
    config = replace(
        _config(workdir, pki, endorsement_ca), enrollment=EnrollmentConfig(inventory=inventory)
    )
    pending = replace(device(5), state=DeviceState.PENDING_APPROVAL, zone="model-development")
    dev = pending.device_id

    async def refusal(call: Any) -> tuple[str, str]:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        return "OK", ""

    async def scenario() -> Outcomes:
        async with (
            running(config) as verifier,
            _channel(pki, verifier.attestation_port, "otto") as channel,
        ):
            await verifier.repos.devices.save(pending, now=NOW, event="enrolled:pending_approval")
            await verifier.repos.devices.save(pinned, now=NOW, event="enrolled:enrolled")
            query = query_pb2_grpc.QueryStub(channel)
            approved = await query.Approve(
                query_pb2.ApproveRequest(
                    device_id=dev, zone="production-inference", labels={"sku": "h100"}
                ),
                timeout=5,
            )
            moved = await query.SetZone(
                query_pb2.SetZoneRequest(device_id=dev, zone="management"), timeout=5
            )
            revoked = await query.Revoke(
                query_pb2.RevokeRequest(device_id=dev, reason="lost in transit"), timeout=5
            )
            t = 5
            refused = {
                "approve revoked": await refusal(
                    query.Approve(query_pb2.ApproveRequest(device_id=dev), timeout=t)
                ),
                "move revoked": await refusal(
                    query.SetZone(query_pb2.SetZoneRequest(device_id=dev, zone="x"), timeout=t)
                ),
                "revoke again": await refusal(
                    query.Revoke(query_pb2.RevokeRequest(device_id=dev, reason="r"), timeout=t)
                ),
                "no reason": await refusal(
                    query.Revoke(query_pb2.RevokeRequest(device_id=dev), timeout=t)
                ),
                "bad zone": await refusal(
                    query.SetZone(
                        query_pb2.SetZoneRequest(device_id=pinned.device_id, zone="bad zone"),
                        timeout=t,
                    )
                ),
                "inventory wins": await refusal(
                    query.SetZone(
                        query_pb2.SetZoneRequest(device_id=pinned.device_id, zone="x"), timeout=t
                    )
                ),
                "no device": await refusal(
                    query.Approve(query_pb2.ApproveRequest(device_id="cd" * 32), timeout=t)
                ),
            }
            return Outcomes(approved, moved, revoked, refused)

    out = asyncio.run(scenario())
    assert out.approved.state == common_pb2.DEVICE_STATE_ENROLLED
    assert (out.approved.host.zone, dict(out.approved.host.labels)) == (
        "production-inference",
        {"sku": "h100"},
    )
    assert (out.moved.host.zone, dict(out.moved.host.labels)) == ("management", {})
    assert out.revoked.device.state == common_pb2.DEVICE_STATE_REVOKED
    refused = out.refused
    assert refused["approve revoked"] == (
        "FAILED_PRECONDITION",
        f"device {dev} is revoked, not pending approval",
    )
    assert refused["move revoked"] == (
        "FAILED_PRECONDITION",
        f"device {dev} is revoked: it is not moved",
    )
    assert refused["revoke again"] == ("FAILED_PRECONDITION", f"device {dev} is revoked already")
    assert refused["no reason"][0] == "INVALID_ARGUMENT"
    assert "RevokeRequest.reason: a revocation needs a reason" in refused["no reason"][1]
    assert refused["bad zone"][0] == "INVALID_ARGUMENT"
    assert "zone 'bad zone' is not" in refused["bad zone"][1]
    assert refused["inventory wins"][0] == "FAILED_PRECONDITION"
    assert (
        f"is listed in the inventory {inventory} (zone data-processing)"
        in (refused["inventory wins"][1])
    )
    assert refused["no device"][0] == "NOT_FOUND"

    trail = _audit(config.database, dev)
    events = [(event, actor) for event, actor, _ in trail]
    assert events[0] == ("enrolled:pending_approval", "device")
    assert events[1:5] == [
        ("assigned:approval", "operator/otto"),
        ("approved", "operator/otto"),
        ("assigned:operator", "operator/otto"),
        ("revoked", "operator/otto"),
    ]
    assert trail[1][2]["was"] == {"zone": "model-development", "labels": {}}
    assert trail[4][2]["reason"] == "lost in transit"
    # Nothing the refused calls tried was written.
    assert len(trail) == 5
    assert [e for e, _, _ in _audit(config.database, pinned.device_id)] == ["enrolled:enrolled"]


def test_the_approve_command_uses_the_lifecycle_and_names_the_operator(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """`devtrust approve` goes through the lifecycle on the running verifier, and the audit
    names the operator whose profile ran it."""
    config = _config(workdir, pki, endorsement_ca)
    pending = replace(device(6), state=DeviceState.PENDING_APPROVAL)

    async def approve() -> Run:
        async with running(config) as verifier:
            await verifier.repos.devices.save(pending, now=NOW, event="enrolled:pending_approval")
            otto = str(profile(workdir, pki, verifier, "otto"))
            return await devtrust(
                "approve", pending.device_id, "--zone", "management", "--profile", otto
            )

    run = asyncio.run(approve())
    assert run.status == 0, run
    assert pending.device_id[:12] in run.out
    events = _audit(config.database, pending.device_id)
    assert [e for e, _, _ in events] == [
        "enrolled:pending_approval",
        "assigned:approval",
        "approved",
    ]
    assert all(actor == "operator/otto" for _, actor, _ in events[1:])


# --- the lifecycle, case by case -------------------------------------------------------------

DEV = DeviceId("ef" * 32)
PENDING = Standing(DeviceState.PENDING_APPROVAL, "a", {"k": "v"})
ENROLLED = Standing(DeviceState.ENROLLED, "a", {"k": "v"})
REVOKED = Standing(DeviceState.REVOKED, "a", {"k": "v"})


@dataclass(frozen=True)
class Case:
    name: str
    before: Standing
    action: lifecycle.Action
    after: Standing | None  # None: refused
    events: tuple[str, ...] = ()
    refusal: str = ""
    pinned: str | None = None


CASES = [
    Case("approve a pending device", PENDING, lifecycle.Approve(),
         Standing(DeviceState.ENROLLED, "a", {"k": "v"}), ("approved",)),
    Case("approve with a zone", PENDING, lifecycle.Approve(zone="b"),
         Standing(DeviceState.ENROLLED, "b", {"k": "v"}), ("assigned:approval", "approved")),
    Case("approve an enrolled device with labels: moves it", ENROLLED,
         lifecycle.Approve(labels={}), Standing(DeviceState.ENROLLED, "a", {}),
         ("assigned:approval",)),
    Case("approve an enrolled device with nothing", ENROLLED, lifecycle.Approve(), None,
         refusal="is enrolled, not pending approval"),
    Case("approve a revoked device", REVOKED, lifecycle.Approve(zone="b"), None,
         refusal="is revoked, not pending approval"),
    Case("approve with a zone the inventory pins", PENDING, lifecycle.Approve(zone="b"), None,
         refusal=r"is listed in the inventory x \(zone a\), which wins",
         pinned="the inventory x (zone a)"),
    Case("approve pinned without a zone", PENDING, lifecycle.Approve(),
         Standing(DeviceState.ENROLLED, "a", {"k": "v"}), ("approved",), pinned="the inventory x"),
    Case("set zone", ENROLLED, lifecycle.SetZone("", {}),
         Standing(DeviceState.ENROLLED, "", {}), ("assigned:operator",)),
    Case("set zone to what it is", ENROLLED, lifecycle.SetZone("a", {"k": "v"}), ENROLLED),
    Case("set a bad zone", ENROLLED, lifecycle.SetZone("no spaces", {}), None,
         refusal="zone 'no spaces' is not"),
    Case("set bad labels", ENROLLED, lifecycle.SetZone("a", {"": "v"}), None,
         refusal="label key '' is not"),
    Case("move a revoked device", REVOKED, lifecycle.SetZone("b", {}), None,
         refusal="is revoked: it is not moved"),
    Case("revoke", ENROLLED, lifecycle.Revoke("stolen"),
         Standing(DeviceState.REVOKED, "a", {"k": "v"}), ("revoked",)),
    Case("revoke a pending device", PENDING, lifecycle.Revoke("never"),
         Standing(DeviceState.REVOKED, "a", {"k": "v"}), ("revoked",)),
    Case("revoke twice", REVOKED, lifecycle.Revoke("again"), None, refusal="revoked already"),
    Case("revoke without a reason", ENROLLED, lifecycle.Revoke(" "), None,
         refusal="needs a reason"),
    Case("revoke with a control character", ENROLLED, lifecycle.Revoke("a\nb"), None,
         refusal="printable characters"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lifecycle_transitions(case: Case) -> None:
    if case.after is None:
        with pytest.raises((FailedPrecondition, MalformedInput), match=case.refusal):
            lifecycle.transition(DEV, case.before, case.action, pinned=case.pinned)
        return
    change = lifecycle.transition(DEV, case.before, case.action, pinned=case.pinned)
    assert change.before == case.before
    assert change.after == case.after
    assert tuple(e.event for e in change.events) == case.events
    assert all(isinstance(e, AuditEvent) for e in change.events)


def test_an_approval_records_what_the_device_had() -> None:
    change = lifecycle.transition(DEV, PENDING, lifecycle.Approve(zone="b", labels={"x": "y"}))
    assert [e.detail for e in change.events] == [
        {"zone": "b", "labels": {"x": "y"}, "was": {"zone": "a", "labels": {"k": "v"}}},
        {"state": "enrolled"},
    ]
    assert change.approved
    assert change.assigned


# --- roles and where the configuration gives them ------------------------------------------


def test_configured_roles_are_checked_when_the_configuration_loads(tmp_path: Path) -> None:
    from devtrust.core.errors import ConfigError
    from devtrust.verifier.config import VerifierConfig

    path = tmp_path / "verifier.yaml"
    path.write_text(yaml.safe_dump({"operators": {"ada": "root"}}))
    with pytest.raises(ConfigError, match=r"operators.ada: unknown role 'root'"):
        VerifierConfig.load(path)
    path.write_text(yaml.safe_dump({"operators": {"bad name": "admin"}}))
    with pytest.raises(ConfigError, match=r"operator name 'bad name' is not"):
        VerifierConfig.load(path)
    path.write_text(yaml.safe_dump({"operators": {"ada": "relying-party"}}))
    assert VerifierConfig.load(path).roles == {"ada": Role.RELYING_PARTY}


def test_roles_are_ordered() -> None:
    assert [r.label for r in Role] == ["relying-party", "viewer", "operator", "admin"]
    assert Role.ADMIN.grants(Role.VIEWER)
    assert not Role.VIEWER.grants(Role.OPERATOR)
    assert not Role.RELYING_PARTY.grants(Role.VIEWER)
    with pytest.raises(ValueError, match="unknown role 'owner'"):
        Role.parse("owner")
