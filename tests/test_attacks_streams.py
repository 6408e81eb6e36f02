"""Issue 7: a verdict the judged device cannot forge or freeze: streams and slow appraisals.

Each test is an attack by a device that controls its own agent but not its TPM, over the
real wire protocol: a real verifier on loopback with mTLS and SQLite, swtpm devices, and
messages written by hand where the real agent would not write them. Each fails when the
check it covers is removed.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2, query_pb2
from devtrust.verifier import appraisal, attestor
from devtrust.verifier.appraisal import Appraisal, Evidence, Expectation
from devtrust.verifier.config import DEFAULT_POLICY, LimitsConfig
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from tests.attack_helpers import _flood
from tests.conftest import SwtpmFactory
from tests.env import (
    Agent,
    AttestStream,
    enrolled_agent,
    first_results,
    manual_stream,
    operator_stub,
    quote_evidence,
    read_message,
    running,
    stream_channel,
    verifier_config,
)

pytestmark = pytest.mark.swtpm


def test_a_slow_appraisal_does_not_hold_up_other_devices_or_queries(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Device A's appraisal blocks (as a costly one would) until device B has attested and
    an operator query has been answered: appraisal runs off the event loop."""
    config = verifier_config(workdir, pki, endorsement_ca)
    tpm_a, tpm_b = swtpm_factory(), swtpm_factory()
    release = threading.Event()
    entered = threading.Event()
    real_appraise = appraisal.appraise  # the function attestor imported, before the patch
    slow_device: list[str] = []

    timed_out: list[bool] = []

    def appraise(evidence: Evidence, expect: Expectation, *, now: datetime.datetime) -> Appraisal:
        if expect.device_id in slow_device:
            entered.set()
            # Released by the test once B is served: never, if this held the event loop.
            timed_out.append(not release.wait(15))
        return real_appraise(evidence, expect, now=now)

    monkeypatch.setattr(attestor, "appraise", appraise)

    async def scenario() -> tuple[int, int]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm_a, "a") as a,
            enrolled_agent(workdir, pki, verifier, tpm_b, "b") as b,
        ):
            slow_device.append(a.enrollment.device_id)
            slow = asyncio.create_task(first_results(a, limit_s=60))
            await asyncio.to_thread(entered.wait, 30)
            try:
                [result] = await first_results(b, limit_s=20)
                channel, query = operator_stub(pki, verifier, workdir)
                async with channel:
                    listed = await query.ListDevices(query_pb2.ListDevicesRequest(), timeout=5)
            finally:
                release.set()
            [slow_result] = await slow
            assert slow_result.trust.tier is Tier.AFFIRMING
            return result.trust.tier, len(listed.devices)

    tier, devices = asyncio.run(scenario())
    assert timed_out == [False]
    assert tier is Tier.AFFIRMING
    assert devices == 2


def test_a_policy_a_device_makes_slow_is_abandoned_and_holds_up_nobody(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """8,192 tainted modules (within the limits) make the default policy's `found` for
    os.kernel_taint quadratic in the CEL runtime, which holds the interpreter lock: 25 s on a
    thread of the verifier, every other stream stopped. Policies run in worker processes
    within attestation.policy_budget_s: the device gets policy.budget_exceeded, and an
    operator's query is answered while its evaluation runs."""
    config = replace(
        verifier_config(workdir, pki, endorsement_ca, policy_budget_s=1.0),
        policy=DEFAULT_POLICY,
    )
    modules = [attestation_pb2.KernelModule(name=f"m{i}", taint="Q") for i in range(8192)]
    body = evidence_body(
        host=host_facts(),
        certify_key_spki=b"",
        now=datetime.datetime.now(datetime.UTC),
        os=attestation_pb2.OsPosture(modules=modules),
    )

    async def scenario() -> tuple[list[str], attestation_pb2.VerifierMessage]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            order: list[str] = []
            channel, query = operator_stub(pki, verifier, workdir)

            async def listing() -> None:
                await asyncio.sleep(0.3)  # the evaluation is under way
                await query.ListDevices(query_pb2.ListDevicesRequest(), timeout=30)
                order.append("query answered")

            async def hostile() -> attestation_pb2.VerifierMessage:
                reply = await manual_stream(
                    pki, verifier, agent, lambda ch: quote_evidence(agent, ch, body=body)
                )
                order.append("hostile appraised")
                return reply

            async with channel:
                reply, _ = await asyncio.gather(hostile(), listing())
            return order, reply

    order, reply = asyncio.run(scenario())
    assert order == ["query answered", "hostile appraised"]
    assert "policy.budget_exceeded" in [f.id for f in reply.result.trust.findings]
    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED


# --- 8. floods ------------------------------------------------------------------------------


async def _open(
    pki: PkiFiles, verifier: RunningVerifier, agent: Agent
) -> tuple[grpc.aio.Channel, AttestStream, attestation_pb2.Challenge]:
    channel = stream_channel(pki, verifier, agent.enrollment)
    call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
    first = await read_message(call)
    assert first.HasField("challenge")
    return channel, call, first.challenge


def test_a_newer_stream_replaces_the_older_one(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[grpc.StatusCode, str, attestation_pb2.VerifierMessage]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            old_channel, old, _ = await _open(pki, verifier, agent)
            new_channel, new, challenge = await _open(pki, verifier, agent)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await old.read()
                await new.write(
                    attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge))
                )
                reply = await read_message(new)
            finally:
                await old_channel.close()
                await new_channel.close()
            return err.value.code(), err.value.details() or "", reply

    code, details, reply = asyncio.run(scenario())
    assert code == grpc.StatusCode.ABORTED
    assert "a newer attestation stream replaced this one" in details
    assert reply.result.trust.tier == common_pb2.TIER_AFFIRMING


def test_reconnecting_does_not_buy_appraisals(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Each new stream is challenged at once, and appraising can cost far more than a
    reconnect: a device's new stream waits out ``stream_challenge_gap_s`` since its last
    challenge on any stream."""
    config = verifier_config(workdir, pki, endorsement_ca, stream_challenge_gap_s=30.0)

    async def scenario() -> tuple[bool, bool]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory(), "a") as agent,
            enrolled_agent(workdir, pki, verifier, swtpm_factory(), "b") as bystander,
        ):
            first_channel, first, challenge = await _open(pki, verifier, agent)
            await first.write(
                attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge))
            )
            await first.read()
            await first_channel.close()
            channel = stream_channel(pki, verifier, agent.enrollment)
            call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
            await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
            # A PostureChanged note does not jump the gap either.
            await call.write(
                attestation_pb2.AgentMessage(
                    posture_changed=attestation_pb2.PostureChanged(signals=["sshd_config"])
                )
            )
            reading = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({reading}, timeout=1.5)
            await channel.close()
            # Another device is not held back by it.
            other_channel, _, other = await _open(pki, verifier, bystander)
            await other_channel.close()
            return bool(done), bool(other.nonce)

    challenged_again, other_challenged = asyncio.run(scenario())
    assert not challenged_again
    assert other_challenged


def test_posture_notes_are_coalesced_and_a_flood_ends_the_stream(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = verifier_config(
        workdir, pki, endorsement_ca, posture_min_interval_s=30.0, posture_notes_per_minute=50
    )
    note = attestation_pb2.AgentMessage(
        posture_changed=attestation_pb2.PostureChanged(signals=["listening_sockets"])
    )

    async def scenario() -> tuple[bool, bool, grpc.StatusCode, str]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            channel, call, challenge = await _open(pki, verifier, agent)
            try:
                await call.write(
                    attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge))
                )
                await call.read()  # the result; the next challenge is 30 s away
                # The first change is challenged at once.
                await call.write(note)
                first = await asyncio.wait_for(read_message(call), 5)
                await call.write(
                    attestation_pb2.AgentMessage(
                        evidence=await quote_evidence(agent, first.challenge)
                    )
                )
                await call.read()
                # More changes within posture_min_interval_s: no challenge now. (The read
                # stays pending: cancelling it would cancel the call.)
                for _ in range(3):
                    await call.write(note)
                reading = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({reading}, timeout=1.5)
                coalesced = not done
                # A flood past posture_notes_per_minute ends the stream: 4 notes so far, 47
                # more make 51 within the minute. (No more than that: writing on after the
                # verifier ended the call races its status with a stream reset.)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _flood(call, note, 47, reading)
            finally:
                await channel.close()
            details = err.value.details() or ""
            return first.HasField("challenge"), coalesced, err.value.code(), details

    challenged, coalesced, code, details = asyncio.run(scenario())
    assert challenged
    assert coalesced
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "attestation.posture_notes_per_minute" in details


def test_an_operators_change_reaches_a_live_stream(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A device decides when its stream ends: a zone an operator assigns, or a revocation,
    must not wait for it. The next appraisal on the same stream uses the new zone (in the
    certificate too), and after a revocation the stream ends before anything is issued."""
    from cryptography import x509

    from devtrust.core.claims import DeviceClaims
    from devtrust.verifier.records import DeviceState

    config = verifier_config(workdir, pki, endorsement_ca, interval_s=0.2)

    async def scenario() -> tuple[list[str], grpc.StatusCode, str, int]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            device_id = DeviceId(agent.enrollment.device_id)
            channel, call, challenge = await _open(pki, verifier, agent)
            zones = []
            try:
                for step in range(2):
                    if step == 1:
                        now = datetime.datetime.now(datetime.UTC)
                        assert await verifier.repos.devices.set_assignment(
                            device_id,
                            zone="quarantine",
                            labels={},
                            now=now,
                            event="assigned:operator",
                        )
                    await call.write(
                        attestation_pb2.AgentMessage(
                            evidence=await quote_evidence(agent, challenge)
                        )
                    )
                    reply = await read_message(call)
                    cert = x509.load_der_x509_certificate(reply.result.certificate.certificate_der)
                    claims = DeviceClaims.from_certificate(cert)
                    assert claims is not None
                    zones.append(claims.zone)
                    challenge = (await read_message(call)).challenge
                await verifier.repos.devices.set_state(
                    device_id,
                    DeviceState.REVOKED,
                    now=datetime.datetime.now(datetime.UTC),
                    event="revoked",
                )
                before = (await verifier.repos.counts())["certificates"]
                await call.write(
                    attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge))
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                issued = (await verifier.repos.counts())["certificates"] - before
            finally:
                await channel.close()
            return zones, err.value.code(), err.value.details() or "", issued

    zones, code, details, issued = asyncio.run(scenario())
    assert zones == ["", "quarantine"]
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "is revoked" in details
    assert issued == 0


def test_a_new_ak_ends_the_stream_of_the_old_one(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """The device enrolled again with another AK (its record now names that AK): evidence on
    a stream opened with the old AK is not appraised."""
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            device_id = DeviceId(agent.enrollment.device_id)
            channel, call, challenge = await _open(pki, verifier, agent)
            try:
                record = await verifier.repos.devices.get(device_id)
                assert record is not None
                other = replace(record, ak_public=record.ak_public + b"\x00")
                await verifier.repos.devices.save(
                    other, now=datetime.datetime.now(datetime.UTC), event="enrolled:enrolled"
                )
                await call.write(
                    attestation_pb2.AgentMessage(evidence=await quote_evidence(agent, challenge))
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
            finally:
                await channel.close()
            return err.value.code(), err.value.details() or ""

    code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "enrolled again with another AK" in details


def test_a_posture_note_naming_too_many_signals_is_refused(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = replace(
        verifier_config(workdir, pki, endorsement_ca), limits=LimitsConfig(max_posture_signals=3)
    )
    note = attestation_pb2.AgentMessage(
        posture_changed=attestation_pb2.PostureChanged(signals=["a", "b", "c", "d"])
    )

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            channel, call, _ = await _open(pki, verifier, agent)
            try:
                await call.write(note)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
            finally:
                await channel.close()
            return err.value.code(), err.value.details() or ""

    code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "limits.max_posture_signals" in details


# --- 9. forged log lines ---------------------------------------------------------------------


def test_device_supplied_strings_cannot_forge_log_lines(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The default policy quotes what it found (here a forged sshd setting) in its findings.
    config = replace(verifier_config(workdir, pki, endorsement_ca), policy=DEFAULT_POLICY)
    forged = "x\n2026-12-01 INFO verifier: device deadbeef is affirming"

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            channel = stream_channel(pki, verifier, agent.enrollment)
            call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=30)
            await call.write(
                attestation_pb2.AgentMessage(hello=attestation_pb2.Hello(agent_version=forged))
            )
            first = await read_message(call)
            await call.write(
                attestation_pb2.AgentMessage(
                    posture_changed=attestation_pb2.PostureChanged(signals=[forged])
                )
            )
            body = evidence_body(
                host=host_facts(),
                certify_key_spki=b"",
                now=datetime.datetime.now(datetime.UTC),
                os=attestation_pb2.OsPosture(
                    sshd=attestation_pb2.SshdSettings(permit_root_login=forged)
                ),
            )
            await call.write(
                attestation_pb2.AgentMessage(
                    evidence=await quote_evidence(agent, first.challenge, body=body)
                )
            )
            await call.read()
            await channel.close()

    with caplog.at_level(logging.DEBUG, logger="devtrust.verifier"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("devtrust.verifier")]
    assert any("2026-12-01 INFO verifier" in m for m in messages)  # the text is logged ...
    assert not [m for m in messages if "\n" in m]  # ... escaped, never as a line of its own


def test_escaping_is_reversible_enough_to_read_and_cannot_be_faked() -> None:
    from devtrust.verifier.logtext import printable

    assert printable("h\nx") == "h\\nx"
    assert printable("a\\nb") == "a\\\\nb"  # a literal backslash-n is not a newline escape
    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("é ok") == "é ok"
    assert printable("y" * 300).endswith("...")
