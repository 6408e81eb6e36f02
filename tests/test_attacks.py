"""Issue 7: a verdict the judged device cannot forge or freeze.

Each test is an attack by a device that controls its own agent but not its TPM, over the
real wire protocol: a real verifier on loopback with mTLS and SQLite, swtpm devices, and
messages written by hand where the real agent would not write them. Each fails when the
check it covers is removed.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import struct
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import new_key, spki
from devtrust.core.binding import sign_possession
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2, query_pb2
from devtrust.verifier import appraisal, attestor
from devtrust.verifier.appraisal import Appraisal, Evidence, Expectation
from devtrust.verifier.config import DEFAULT_POLICY, LimitsConfig
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from tests import eventlogs
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
from tests.test_measured_boot_e2e import _extend, secure_boot_variable

pytestmark = pytest.mark.swtpm
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_ACTION = 0x80000007
EV_SEPARATOR = 0x4
BANKS = ("sha1", "sha256")


def _refs(path: Path, **group: object) -> Path:
    path.write_text(yaml.safe_dump({"groups": [{"name": "fleet", **group}]}))
    return path


def _forged_event(pcr: int, type_: int, measured: bytes, logged: bytes) -> bytes:
    """An event whose digests are those of ``measured`` but whose data is ``logged``."""
    out = struct.pack("<III", pcr, type_, len(BANKS))
    for bank in BANKS:
        out += struct.pack("<H", eventlogs.SIZES[bank][0]) + hashlib.new(bank, measured).digest()
    return out + struct.pack("<I", len(logged)) + logged


def _ids(result: attestation_pb2.Result | AttestationResult) -> list[str]:
    return [f.id for f in result.trust.findings]


async def _boot_with_secure_boot_off(agent: Agent) -> bytes:
    """Measure SecureBoot = 0 and a separator into PCR 7 of the agent's swtpm, as firmware
    would; return the honest log of it."""
    off = secure_boot_variable(False)
    await _extend(agent, 7, off)
    await _extend(agent, 7, b"\x00\x00\x00\x00")
    return eventlogs.agile_log(
        [(7, EV_EFI_VARIABLE_DRIVER_CONFIG, off), (7, EV_SEPARATOR, b"\x00\x00\x00\x00")], BANKS
    )


# --- 1. boot facts from unverified event data -----------------------------------------------


@pytest.mark.parametrize("forgery", ["rewritten_data", "unquoted_pcr", "relabelled_separator"])
def test_forged_secure_boot_facts_are_not_believed(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    forgery: str,
) -> None:
    """Secure Boot is off (measured so into PCR 7). The device rewrites the SecureBoot
    variable's data in its log while keeping the digests (PCR 7 still replays), or appends
    a fake SecureBoot = 1 on PCR 23, which no challenge quotes, or (with root at runtime)
    relabels PCR 7's separator as an EV_EFI_ACTION and extends a SecureBoot = 1 after it: the
    event type is not measured, so it decides nothing. Either way the group that requires
    Secure Boot must not be satisfied, and no certificate is issued."""
    tpm = swtpm_factory()
    refs = _refs(workdir / "refs.yaml", secure_boot=True)
    config = replace(verifier_config(workdir, pki, endorsement_ca), reference_values=refs)

    async def scenario() -> AttestationResult:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            honest = await _boot_with_secure_boot_off(agent)
            off, on = secure_boot_variable(False), secure_boot_variable(True)
            if forgery == "rewritten_data":
                log = eventlogs.spec_id_header(BANKS) + b"".join(
                    [
                        _forged_event(7, EV_EFI_VARIABLE_DRIVER_CONFIG, off, on),
                        eventlogs.agile_event(7, EV_SEPARATOR, b"\x00\x00\x00\x00", BANKS),
                    ]
                )
            elif forgery == "unquoted_pcr":
                log = honest + eventlogs.agile_event(23, EV_EFI_VARIABLE_DRIVER_CONFIG, on, BANKS)
            else:
                await _extend(agent, 7, on)
                log = eventlogs.spec_id_header(BANKS) + b"".join(
                    [
                        eventlogs.agile_event(7, EV_EFI_VARIABLE_DRIVER_CONFIG, off, BANKS),
                        eventlogs.agile_event(7, EV_EFI_ACTION, b"\x00\x00\x00\x00", BANKS),
                        eventlogs.agile_event(7, EV_EFI_VARIABLE_DRIVER_CONFIG, on, BANKS),
                    ]
                )
            assert agent.cfg.event_log is not None
            agent.cfg.event_log.write_bytes(log)
            agent.cfg = replace(agent.cfg, renew_at=0.01)
            [result] = await first_results(agent)
            return result

    result = asyncio.run(scenario())
    assert result.trust.tier is Tier.CONTRAINDICATED
    assert result.certificate is None
    [sb] = [f for f in result.trust.findings if f.id == "refs.secure_boot"]
    assert sb.expected == "on"
    assert sb.found != "on"
    if forgery == "rewritten_data":
        [mismatch] = [f for f in result.trust.findings if f.id == "eventlog.data_digest_mismatch"]
        assert "PCR 7" in mismatch.message
        assert "EV_EFI_VARIABLE_DRIVER_CONFIG" in mismatch.message
    if forgery == "relabelled_separator":
        assert "eventlog.late_secure_boot_variable" in _ids(result)


def test_a_boot_application_relabelled_as_a_driver_is_still_a_boot_application(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """The event type is not measured: an application outside the allowlist, logged as
    EV_EFI_BOOT_SERVICES_DRIVER, is still what PCR 4 measured."""
    tpm = swtpm_factory()
    allowed = b"an allowlisted boot loader image"
    forbidden = b"a boot loader nobody approved"
    refs = _refs(workdir / "refs.yaml", boot_applications=[hashlib.sha256(allowed).hexdigest()])
    config = replace(verifier_config(workdir, pki, endorsement_ca), reference_values=refs)

    async def scenario() -> AttestationResult:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            await _extend(agent, 4, forbidden)
            assert agent.cfg.event_log is not None
            agent.cfg.event_log.write_bytes(
                eventlogs.agile_log([(4, EV_EFI_BOOT_SERVICES_DRIVER, forbidden)], BANKS)
            )
            agent.cfg = replace(agent.cfg, renew_at=0.01)
            [result] = await first_results(agent)
            return result

    result = asyncio.run(scenario())
    [refused] = [f for f in result.trust.findings if f.id == "refs.boot_application_not_allowed"]
    assert refused.found == hashlib.sha256(forbidden).hexdigest()
    assert result.trust.tier is Tier.CONTRAINDICATED
    assert result.certificate is None


# --- 2. unquoted PCR values ------------------------------------------------------------------


def test_pcr_values_outside_the_quote_are_refused_and_nothing_is_stored(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A golden value for PCR 15, which the challenge does not select, sent beside the
    quoted ones: refused as malformed, not passed on to reference values or the store."""
    tpm = swtpm_factory()
    refs = _refs(workdir / "refs.yaml", pcrs={"sha256": {15: "11" * 32}})
    config = replace(verifier_config(workdir, pki, endorsement_ca), reference_values=refs)

    async def scenario() -> tuple[grpc.aio.AioRpcError, dict[str, int], dict[str, int]]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):

            async def build(ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
                evidence = await quote_evidence(agent, ch)
                sha256 = next(b for b in evidence.pcrs if b.hash_alg == "sha256")
                sha256.values[15] = bytes.fromhex("11" * 32)
                return evidence

            before = await verifier.repos.counts()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await manual_stream(pki, verifier, agent, build)
            return err.value, before, (await verifier.repos.counts())

    err, before, after = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256:15" in (err.details() or "")
    assert before == after


# --- 3. event log omitted --------------------------------------------------------------------


@pytest.mark.parametrize("event_rules", [False, True])
def test_an_omitted_event_log_is_a_finding_and_executables_are_not_affirmed(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    event_rules: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tpm = swtpm_factory()
    group: dict[str, Any] = {"pcrs": {"sha256": {9: "00" * 32}}}
    if event_rules:
        group["secure_boot"] = True
    refs = _refs(workdir / "refs.yaml", **group)
    config = replace(verifier_config(workdir, pki, endorsement_ca), reference_values=refs)

    async def scenario() -> AttestationResult:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            agent.cfg = replace(agent.cfg, event_log=None, renew_at=0.01)
            [result] = await first_results(agent)
            return result

    with caplog.at_level(logging.INFO, logger="devtrust.verifier"):
        result = asyncio.run(scenario())
    [missing] = [f for f in result.trust.findings if f.id == "eventlog.missing"]
    # The verifier's log says why no certificate was issued.
    tier = "contraindicated" if event_rules else "warning"
    assert any(
        f"cert=- (withheld: tier {tier} is below certificates.min_tier affirming)" in r.getMessage()
        for r in caplog.records
    )
    claims = {c.name: c.value for c in result.trust.claims}
    assert claims["executables"] >= 32  # golden PCR 9 matched, yet nothing says what booted
    assert result.certificate is None
    if event_rules:
        assert missing.severity == "contraindicated"
        assert result.trust.tier is Tier.CONTRAINDICATED
    else:
        assert missing.severity == "warning"
        assert result.trust.tier is Tier.WARNING


def test_a_log_in_banks_the_quote_does_not_cover_explains_nothing(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A log that declares only SHA-1 while the challenge quotes SHA-256 replays against
    nothing: it must not count as the device's log (no finding would say otherwise)."""
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> AttestationResult:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            assert agent.cfg.event_log is not None
            agent.cfg.event_log.write_bytes(eventlogs.spec_id_header(("sha1",)))
            agent.cfg = replace(agent.cfg, renew_at=0.01)
            [result] = await first_results(agent)
            return result

    result = asyncio.run(scenario())
    [unverified] = [f for f in result.trust.findings if f.id == "eventlog.unverified"]
    assert "sha1" in unverified.message
    assert result.trust.tier is Tier.WARNING
    assert result.certificate is None


def test_a_log_with_an_impossible_bank_is_malformed_not_an_internal_error(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A Spec ID header declaring a bank of digestSize 0 crashed the replay (INTERNAL): it is
    a malformed log, appraised as such, and the verifier answers."""
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 3)
    body += struct.pack("<HHHHHH", 0x0004, 20, 0x000B, 32, 0x0099, 0) + b"\x00"
    header = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body

    async def scenario() -> AttestationResult:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            assert agent.cfg.event_log is not None
            agent.cfg.event_log.write_bytes(header)
            [result] = await first_results(agent)
            return result

    result = asyncio.run(scenario())
    [malformed] = [f for f in result.trust.findings if f.id == "eventlog.malformed"]
    assert "digestSize 0" in malformed.message
    assert result.trust.tier is Tier.CONTRAINDICATED


def test_host_facts_past_their_limits_are_refused_at_enrollment(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A 3 MB hostname would be stored and sent in every Device message, until a page of
    ListDevices no longer fits in a gRPC message."""
    from devtrust.agent.tpm import TpmBackend
    from devtrust.v1 import enrollment_pb2, enrollment_pb2_grpc
    from tests.env import channel_credentials

    config = verifier_config(workdir, pki, endorsement_ca)
    backend = TpmBackend(swtpm_factory().tcti)

    async def scenario() -> tuple[grpc.aio.AioRpcError, dict[str, int], dict[str, int]]:
        async with (
            running(config) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            host = host_facts()
            host.hostname = "h" * 3_000_000
            request = enrollment_pb2.EnrollRequest(
                ek_certificate=backend.ek_certificate() or b"",
                ek_public=backend.ek_public(),
                ak_public=backend.ak_public(),
                host=host,
                channel_key_spki=spki(new_key()),
            )
            before = await verifier.repos.counts()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=10)
            return err.value, before, (await verifier.repos.counts())

    try:
        err, before, after = asyncio.run(scenario())
    finally:
        backend.close()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "EnrollRequest.host.hostname: 3000000 characters, more than 253" in (err.details() or "")
    assert before == after


# --- 6. certificates for keys the device does not hold ---------------------------------------


@pytest.mark.parametrize("proof", ["none", "another_device", "another_key"])
def test_a_key_is_certified_only_with_proof_of_possession(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    proof: str,
) -> None:
    """The device names the verifier's own TLS server key (or any key it does not hold)."""
    server_key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    target = server_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    async def build(agent: Agent, ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
        signature = b""
        if proof == "another_device":  # a proof someone made for their own device id
            signature = sign_possession(server_key, ch.nonce, "0" * 64)
        elif proof == "another_key":  # a proof by a key the device holds, not the named one
            signature = sign_possession(new_key(), ch.nonce, agent.enrollment.device_id)
        body = evidence_body(
            host=host_facts(),
            certify_key_spki=target,
            certify_key_proof=signature,
            now=datetime.datetime.now(datetime.UTC),
        )
        return await quote_evidence(agent, ch, body=body)

    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[attestation_pb2.VerifierMessage, dict[str, int]]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, swtpm_factory()) as agent,
        ):
            reply = await manual_stream(pki, verifier, agent, lambda ch: build(agent, ch))
            return reply, (await verifier.repos.counts())

    reply, counts = asyncio.run(scenario())
    assert not reply.result.HasField("certificate")
    assert "certificate.key_not_possessed" in _ids(reply.result)
    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED
    assert counts["certificates"] == 1  # the channel certificate only


# --- 7. limits, and no appraisal holds up other devices ------------------------------------


def test_bodies_and_logs_past_their_limits_are_refused_naming_the_limit(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    limits = LimitsConfig(max_gpus=4, max_event_log_bytes=4096)
    config = replace(verifier_config(workdir, pki, endorsement_ca), limits=limits)
    tpm_a, tpm_b = swtpm_factory(), swtpm_factory()

    async def scenario() -> tuple[list[grpc.aio.AioRpcError], dict[str, int], dict[str, int]]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm_a, "a") as a,
            enrolled_agent(workdir, pki, verifier, tpm_b, "b") as b,
        ):
            gpus = attestation_pb2.GpuState(
                source="nvml", gpus=[attestation_pb2.Gpu(index=i) for i in range(5)]
            )
            many_gpus = evidence_body(
                host=host_facts(),
                certify_key_spki=b"",
                now=datetime.datetime.now(datetime.UTC),
                gpu=gpus,
            )

            async def gpu_flood(ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
                return await quote_evidence(a, ch, body=many_gpus)

            async def big_log(ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
                evidence = await quote_evidence(b, ch)
                data = eventlogs.spec_id_header(BANKS) + b"".join(
                    eventlogs.agile_event(0xFFFFFFFF, 3, b"x" * 200, BANKS) for _ in range(20)
                )
                evidence.event_log.CopyFrom(
                    attestation_pb2.EventLogChunk(offset=0, data=data, total_size=len(data))
                )
                return evidence

            errors = []
            before = await verifier.repos.counts()
            for agent, build in ((a, gpu_flood), (b, big_log)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await manual_stream(pki, verifier, agent, build)
                errors.append(err.value)
            return errors, before, (await verifier.repos.counts())

    errors, before, after = asyncio.run(scenario())
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert "limits.max_gpus" in (errors[0].details() or "")
    assert "limits.max_event_log_bytes" in (errors[1].details() or "")
    assert before == after


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


async def _flood(
    call: AttestStream,
    note: attestation_pb2.AgentMessage,
    count: int,
    reading: asyncio.Future[object],
) -> None:
    for _ in range(count):
        try:
            await call.write(note)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            break  # the verifier ended the call: its status comes with the pending read
    await asyncio.wait_for(reading, 10)


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
                            device_id, zone="quarantine", labels={}, now=now, event="test"
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
                    event="revoked:test",
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
                    other, now=datetime.datetime.now(datetime.UTC), event="test"
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
