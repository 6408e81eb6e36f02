"""Issue 7: a verdict the judged device cannot forge or freeze: forged evidence and limits.

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
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.pki import PkiFiles
from tests import eventlogs
from tests.conftest import SwtpmFactory
from tests.env import (
    Agent,
    enrolled_agent,
    first_results,
    manual_stream,
    quote_evidence,
    running,
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
