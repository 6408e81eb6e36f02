"""Issue 9: attacks on what the reshape of the attestation path changed.

Like tests/test_attacks_*.py, each test is an attack over the real wire protocol (a real
verifier on loopback with mTLS and SQLite, swtpm devices, messages written by hand), and each
fails when the check it covers is removed. Here the attacker uses what the reshape made
asynchronous: decisions that outlive their stream, and the wait for an appraisal worker.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from pathlib import Path

import grpc
import pytest

from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, query_pb2
from devtrust.verifier import appraisal, attestor
from devtrust.verifier.appraisal import Appraisal, Evidence, Expectation
from devtrust.verifier.inventory import MAX_LABELS
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.records import DeviceRecord, DeviceState
from devtrust.verifier.server import RunningVerifier
from tests.conftest import SwtpmFactory
from tests.env import (
    Agent,
    enrolled_agent,
    operator_stub,
    quote_evidence,
    running,
    stream_channel,
    verifier_config,
)

pytestmark = pytest.mark.swtpm


Stream = grpc.aio.StreamStreamCall[attestation_pb2.AgentMessage, attestation_pb2.VerifierMessage]


async def _open(
    pki: PkiFiles, verifier: RunningVerifier, agent: Agent
) -> tuple[grpc.aio.Channel, Stream, attestation_pb2.Challenge]:
    channel = stream_channel(pki, verifier, agent.enrollment)
    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
    first = await call.read()
    assert isinstance(first, attestation_pb2.VerifierMessage)
    assert first.HasField("challenge")
    return channel, call, first.challenge


def _blocking_appraise(
    monkeypatch: pytest.MonkeyPatch, blocked: list[str]
) -> tuple[threading.Event, threading.Event, list[str]]:
    """Appraisals of the devices in ``blocked`` wait (as a costly one would) until released.
    Returns (entered, release, every device appraised, in order)."""
    entered, release = threading.Event(), threading.Event()
    appraised: list[str] = []
    real_appraise = appraisal.appraise  # the function attestor imported, before the patch

    def appraise(evidence: Evidence, expect: Expectation, *, now: datetime.datetime) -> Appraisal:
        appraised.append(expect.device_id)
        if expect.device_id in blocked:
            entered.set()
            release.wait(15)
        return real_appraise(evidence, expect, now=now)

    monkeypatch.setattr(attestor, "appraise", appraise)
    return entered, release, appraised


def test_closing_streams_does_not_pile_up_decisions(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream its agent closes leaves its decision running (shielded: nothing half made is
    lost). A device that answers each challenge, closes, and reconnects must not stack
    decisions behind a slow one, each holding its evidence (up to 4 MiB of event log) and,
    once it runs, a worker: a device's next decision waits for its previous one."""
    config = verifier_config(workdir, pki, endorsement_ca)
    blocked: list[str] = []
    entered, release, appraised = _blocking_appraise(monkeypatch, blocked)

    async def scenario() -> list[str]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            blocked.append(agent.enrollment.device_id)
            try:
                for _ in range(4):
                    channel, call, challenge = await _open(pki, verifier, agent)
                    await call.write(
                        attestation_pb2.AgentMessage(
                            evidence=await quote_evidence(agent, challenge)
                        )
                    )
                    assert await asyncio.to_thread(entered.wait, 10)
                    await asyncio.sleep(0.3)  # the evidence is in
                    await channel.close()
            finally:
                release.set()
        return appraised

    appraised_ = asyncio.run(scenario())
    assert len(appraised_) == 1


def test_a_device_revoked_while_its_evidence_waits_for_a_worker_gets_nothing(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The device is read again just before its appraisal: one revoked while its evidence
    waits for a worker (every worker busy, as other devices can make them) gets neither a
    Result nor a certificate."""
    config = verifier_config(workdir, pki, endorsement_ca, appraisal_workers=1)
    blocked: list[str] = []
    entered, release, _ = _blocking_appraise(monkeypatch, blocked)
    refreshed: list[str] = []
    real_refresh = attestor.Attestor.refresh

    def refresh(
        self: attestor.Attestor, session: attestor.DeviceSession, record: DeviceRecord | None
    ) -> None:
        refreshed.append(session.record.device_id)
        real_refresh(self, session, record)

    monkeypatch.setattr(attestor.Attestor, "refresh", refresh)

    async def scenario() -> tuple[grpc.StatusCode | None, str, int]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory(), "busy") as busy,
            enrolled_agent(workdir, pki, verifier, swtpm_factory(), "target") as target,
        ):
            blocked.append(busy.enrollment.device_id)
            target_id = DeviceId(target.enrollment.device_id)
            busy_channel, busy_call, busy_challenge = await _open(pki, verifier, busy)
            channel, call, challenge = await _open(pki, verifier, target)
            try:
                # The busy device asks for no certificate: every one counted is the target's.
                body = evidence_body(
                    host=host_facts(),
                    certify_key_spki=b"",
                    now=datetime.datetime.now(datetime.UTC),
                )
                await busy_call.write(
                    attestation_pb2.AgentMessage(
                        evidence=await quote_evidence(busy, busy_challenge, body=body)
                    )
                )
                assert await asyncio.to_thread(entered.wait, 10)
                # The target asks for a certificate while the only worker is busy.
                await call.write(
                    attestation_pb2.AgentMessage(evidence=await quote_evidence(target, challenge))
                )
                for _ in range(20):  # read before its appraisal, or waiting for a worker
                    if target_id in refreshed:
                        break
                    await asyncio.sleep(0.05)
                before = (await verifier.repos.counts())["certificates"]
                await verifier.repos.devices.set_state(
                    target_id,
                    DeviceState.REVOKED,
                    now=datetime.datetime.now(datetime.UTC),
                    event="revoked",
                )
                release.set()
                code, details = None, ""
                try:
                    await call.read()
                except grpc.aio.AioRpcError as err:
                    code, details = err.code(), err.details() or ""
                await busy_call.read()
                issued = (await verifier.repos.counts())["certificates"] - before
            finally:
                release.set()
                await channel.close()
                await busy_channel.close()
            return code, details, issued

    code, details, issued = asyncio.run(scenario())
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "is revoked" in details
    assert issued == 0


def test_a_listing_filtered_by_more_labels_than_a_device_carries_is_malformed(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """ListDevices' label filters are SQL now, one condition each: an operator's request
    with a thousand labels went past SQLite's expression depth and answered INTERNAL (a
    traceback logged per call). No device carries more than MAX_LABELS labels: more is
    malformed, and the answer says so."""
    config = verifier_config(workdir, pki, endorsement_ca)
    labels = {f"k{i}": "v" for i in range(1000)}

    async def scenario() -> tuple[grpc.StatusCode, str, int]:
        async with running(config) as verifier:
            channel, query = operator_stub(pki, verifier, workdir)
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await query.ListDevices(query_pb2.ListDevicesRequest(labels=labels), timeout=10)
                page = await query.ListDevices(
                    query_pb2.ListDevicesRequest(labels=dict(list(labels.items())[:MAX_LABELS])),
                    timeout=10,
                )
            return err.value.code(), err.value.details() or "", len(page.devices)

    code, details, listed = asyncio.run(scenario())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "ListDevicesRequest.labels" in details
    assert listed == 0
