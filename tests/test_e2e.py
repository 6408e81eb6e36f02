"""End to end over real swtpm, real gRPC with mTLS on loopback and a real SQLite file."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store

from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import new_key, spki
from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId
from devtrust.core.spiffe import spiffe_ids
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    common_pb2,
    query_pb2,
)
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.server import RunningVerifier
from tests.conftest import SwtpmFactory
from tests.db import counts as stored_counts
from tests.db import with_repos
from tests.env import (
    Agent,
    channel_credentials,
    enrolled_agent,
    first_results,
    foreign_client_identity,
    manual_stream,
    operator_stub,
    quote_evidence,
    running,
    stream_channel,
    verifier_config,
)

pytestmark = pytest.mark.swtpm


def test_enroll_attest_certify(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> None:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            # Zones are assigned by an operator, never claimed by the device (issue 7).
            assert await verifier.repos.devices.set_assignment(
                DeviceId(agent.enrollment.device_id),
                zone="model-development",
                labels={},
                now=datetime.datetime.now(datetime.UTC),
                event="assigned:test",
            )
            [result] = await first_results(agent)
            assert result.trust.tier is Tier.AFFIRMING
            assert result.trust.score == 100
            assert {c.name: c.value for c in result.trust.claims} == {
                "instance-identity": 2,
                "hardware": 2,
            }
            assert result.certificate is not None

            # The device certificate: our key, the CA's signature, the device's SPIFFE ID,
            # the tier and zone for offline gating, 15 minutes by default.
            device_id = agent.enrollment.device_id
            cert = x509.load_pem_x509_certificate(
                (agent.cfg.runtime_dir / "device.pem").read_bytes()
            )
            key = serialization.load_pem_private_key(
                (agent.cfg.runtime_dir / "device.key").read_bytes(), password=None
            )
            assert cert.public_key() == key.public_key()
            assert (agent.cfg.runtime_dir / "device.key").stat().st_mode & 0o777 == 0o600
            assert spiffe_ids(cert) == [f"spiffe://devtrust.local/device/{device_id}"]
            assert DeviceClaims.from_certificate(cert) == DeviceClaims(
                Tier.AFFIRMING, "model-development"
            )
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            assert lifetime == datetime.timedelta(minutes=16)  # 15 + 1 minute backdating
            # It chains to the device issuing CA, which the agent keeps beside it as the bundle
            # for relying parties; the verifier's own CA is not in that bundle.
            ca = x509.load_pem_x509_certificate(pki.device_ca_cert.read_bytes())
            chain = (
                PolicyBuilder().store(Store([ca])).build_client_verifier().verify(cert, []).chain
            )
            assert chain[-1] == ca
            bundle = (agent.cfg.runtime_dir / "ca-bundle.pem").read_bytes()
            assert x509.load_pem_x509_certificates(bundle) == [ca]

            # The device id is sha256 of the EK's SubjectPublicKeyInfo.
            ek_der = await agent.tpm.run(agent.tpm.backend.ek_certificate)
            assert ek_der is not None  # swtpm's EK has a certificate in NV
            ek = x509.load_der_x509_certificate(ek_der)
            assert (
                device_id
                == hashlib.sha256(
                    ek.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                ).hexdigest()
            )

            # An operator reads the stored result back.
            channel, query = operator_stub(pki, verifier, workdir)
            async with channel:
                score = await query.GetTrustScore(
                    query_pb2.GetTrustScoreRequest(device_id=device_id), timeout=5
                )
                device = await query.GetDevice(
                    query_pb2.GetDeviceRequest(device_id=device_id), timeout=5
                )
                listed = await query.ListDevices(
                    query_pb2.ListDevicesRequest(tier=common_pb2.TIER_AFFIRMING), timeout=5
                )
            assert score.tier == common_pb2.TIER_AFFIRMING
            assert device.state == common_pb2.DEVICE_STATE_ENROLLED
            assert device.host.zone == "model-development"
            assert [d.device_id for d in listed.devices] == [device_id]

    asyncio.run(scenario())
    counts = stored_counts(config.database)
    assert counts["devices"] == 1
    assert counts["trust"] == 1
    assert counts["certificates"] == 2  # the channel certificate and the device certificate


def test_demo_output_verifies_with_openssl(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "devtrust.swtpm.demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "tier        affirming" in run.stdout
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca-bundle.pem"), str(out / "device-cert.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert (out / "result.json").exists()


# --- transport security: the attestation port is mTLS only ------------------------------


async def _try_attest(target: str, creds: grpc.ChannelCredentials) -> grpc.aio.AioRpcError:
    async with grpc.aio.secure_channel(target, creds) as channel:
        call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=5)
        # The refusal surfaces on the write or on the read, depending on timing.
        with pytest.raises(grpc.aio.AioRpcError) as err:  # noqa: PT012
            await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
            await call.read()
        return err.value


def test_attestation_without_client_certificate_is_refused(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with running(verifier_config(workdir, pki, endorsement_ca)) as verifier:
            return await _try_attest(
                f"127.0.0.1:{verifier.attestation_port}", channel_credentials(pki)
            )

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails


def test_client_certificate_from_another_ca_is_refused(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    key_pem, cert_pem = foreign_client_identity("agent", "0" * 64)

    async def scenario() -> grpc.aio.AioRpcError:
        async with running(verifier_config(workdir, pki, endorsement_ca)) as verifier:
            return await _try_attest(
                f"127.0.0.1:{verifier.attestation_port}",
                channel_credentials(pki, key_pem=key_pem, cert_pem=cert_pem),
            )

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_operator_certificate_cannot_attest_and_agent_cannot_query(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()

    async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        async with (
            running(verifier_config(workdir, pki, endorsement_ca)) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            op_channel, _ = operator_stub(pki, verifier, workdir)
            await op_channel.close()
            ca = pki.ca_cert.read_bytes()
            op_creds = grpc.ssl_channel_credentials(
                ca,
                (workdir / "operator-alice.key").read_bytes(),
                (workdir / "operator-alice.pem").read_bytes(),
            )
            as_operator = await _try_attest(f"127.0.0.1:{verifier.attestation_port}", op_creds)
            async with stream_channel(pki, verifier, agent.enrollment) as channel:
                from devtrust.v1 import query_pb2_grpc

                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await query_pb2_grpc.QueryStub(channel).ListDevices(
                        query_pb2.ListDevicesRequest(), timeout=5
                    )
            return as_operator, err.value

    as_operator, as_agent = asyncio.run(scenario())
    assert as_operator.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not a agent identity" in (as_operator.details() or "")
    assert as_agent.code() == grpc.StatusCode.UNAUTHENTICATED


# --- evidence checks over the real stream ------------------------------------------------


def _run_manual(
    workdir: Path,
    pki: PkiFiles,
    ek_ca: EndorsementCA,
    tpm_factory: SwtpmFactory,
    build: Callable[[Agent, attestation_pb2.Challenge], Awaitable[attestation_pb2.Evidence]],
) -> tuple[attestation_pb2.VerifierMessage, dict[str, int]]:
    config = verifier_config(workdir, pki, ek_ca)

    async def scenario() -> attestation_pb2.VerifierMessage:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm_factory()) as agent,
        ):
            return await manual_stream(pki, verifier, agent, lambda ch: build(agent, ch))

    reply = asyncio.run(scenario())
    counts = stored_counts(config.database)
    return reply, counts


def _finding_ids(reply: attestation_pb2.VerifierMessage) -> list[str]:
    return [f.id for f in reply.result.trust.findings]


def test_honest_evidence_by_hand_is_affirmed(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """The control for the tampering tests below: the same hand-driven path, untampered."""
    reply, counts = _run_manual(workdir, pki, endorsement_ca, swtpm_factory, quote_evidence)
    assert reply.result.trust.tier == common_pb2.TIER_AFFIRMING
    assert reply.result.HasField("certificate")
    assert counts["certificates"] == 2


def test_quote_answering_a_different_nonce_is_rejected(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    reply, counts = _run_manual(
        workdir,
        pki,
        endorsement_ca,
        swtpm_factory,
        lambda agent, ch: quote_evidence(agent, ch, quoted_nonce=bytes(32)),
    )
    trust = reply.result.trust
    assert trust.tier == common_pb2.TIER_CONTRAINDICATED
    assert _finding_ids(reply) == ["tpm.quote.qualifying_data_mismatch"]
    assert "does not answer this challenge" in trust.findings[0].message
    assert not reply.result.HasField("certificate")
    assert counts["certificates"] == 1  # the channel certificate only
    assert counts["audit"] == 2  # enrollment and the contraindicated appraisal


def test_evidence_body_changed_after_quoting_is_tampered(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    quoted = evidence_body(host=host_facts(), certify_key_spki=spki(new_key()), now=now)
    swapped = evidence_body(host=host_facts(), certify_key_spki=spki(new_key()), now=now)
    reply, _ = _run_manual(
        workdir,
        pki,
        endorsement_ca,
        swtpm_factory,
        lambda agent, ch: quote_evidence(agent, ch, body=quoted, sent_body=swapped),
    )
    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED
    assert _finding_ids(reply) == ["tpm.quote.qualifying_data_mismatch"]
    assert not reply.result.HasField("certificate")


def test_evidence_for_another_nonce_field_is_rejected(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    async def build(agent: Agent, ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
        evidence = await quote_evidence(agent, ch, quoted_nonce=b"\x01" * 32)
        evidence.nonce = b"\x01" * 32  # a replay of an answer to some other challenge
        return evidence

    reply, _ = _run_manual(workdir, pki, endorsement_ca, swtpm_factory, build)
    assert _finding_ids(reply) == ["tpm.challenge.nonce_mismatch"]
    assert reply.result.trust.tier == common_pb2.TIER_CONTRAINDICATED


def test_malformed_evidence_is_refused_and_nothing_is_written(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    config = verifier_config(workdir, pki, endorsement_ca)
    tpm_a, tpm_b = swtpm_factory(), swtpm_factory()

    async def scenario() -> tuple[
        grpc.aio.AioRpcError, dict[str, int], dict[str, int], list[AttestationResult]
    ]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm_a, "a") as bad,
            enrolled_agent(workdir, pki, verifier, tpm_b, "b") as good,
        ):
            before = await verifier.repos.counts()

            async def garbage(ch: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
                return attestation_pb2.Evidence(
                    nonce=ch.nonce,
                    quote_attest=b"\xff\x54\x43",
                    quote_signature=b"\x00\x18",
                    body=b"",
                )

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await manual_stream(pki, verifier, bad, garbage)
            after = await verifier.repos.counts()
            # The verifier keeps serving: another device attests normally.
            results = await first_results(good)
            return err.value, before, after, results

    err, before, after, results = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TPMT_SIGNATURE: truncated at byte 2" in (err.details() or "")
    assert before == after
    assert results[0].trust.tier is Tier.AFFIRMING


def test_agent_reconnects_after_verifier_restart(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca, interval_s=0.2)

    async def scenario() -> list[AttestationResult]:
        from dataclasses import replace

        from devtrust.verifier.config import ListenConfig

        async with running(config) as first, enrolled_agent(workdir, pki, first, tpm) as agent:
            results: list[AttestationResult] = []
            stop = asyncio.Event()
            client = agent.client(on_result=results.append)
            task = asyncio.create_task(client.run(stop))
            while not results:
                await asyncio.sleep(0.05)
            port = first.attestation_port
            await first.stop(grace=None)  # mid-stream
            seen = len(results)
            fixed = replace(
                config,
                listen=ListenConfig(enrollment="127.0.0.1:0", attestation=f"127.0.0.1:{port}"),
            )
            async with running(fixed):
                for _ in range(200):
                    if len(results) > seen:
                        break
                    await asyncio.sleep(0.05)
            stop.set()
            await task
            return results

    results = asyncio.run(scenario())
    assert len(results) >= 2
    assert all(r.trust.tier is Tier.AFFIRMING for r in results)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_everything_it_started(tmp_path: Path, sig: int) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "devtrust.swtpm.demo", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    parent = psutil.Process(demo.pid)

    def running_swtpms() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "cmdline", "status"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if (
                proc.info["name"] == "swtpm"
                and "devtrust-demo-" in cmd
                and (proc.info["status"] != psutil.STATUS_ZOMBIE)
            ):
                found.append(proc)
        return found

    deadline = time.monotonic() + 30
    while not any(p.ppid() == parent.pid for p in running_swtpms()):
        assert time.monotonic() < deadline, "the demo never started its swtpm"
        assert demo.poll() is None, demo.stdout.read() if demo.stdout else ""
        time.sleep(0.01)
    mine = [p.pid for p in running_swtpms() if p.ppid() == parent.pid]
    demo.send_signal(sig)
    out, _ = demo.communicate(timeout=30)
    assert demo.returncode == 130, out
    assert b"interrupted; everything started was stopped" in out
    assert not [p for p in running_swtpms() if p.pid in mine]


def test_revoked_device_can_neither_attest_nor_enroll_again(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    from devtrust.agent.enroll import enroll
    from devtrust.agent.main import make_host
    from devtrust.verifier.records import DeviceState

    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            await verifier.repos.devices.set_state(
                DeviceId(agent.enrollment.device_id),
                DeviceState.REVOKED,
                now=datetime.datetime.now(datetime.UTC),
                event="revoked",
            )
            async with stream_channel(pki, verifier, agent.enrollment) as channel:
                call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as stream:  # noqa: PT012
                    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                    await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await enroll(agent.cfg, agent.tpm, agent.files, host=make_host(agent.cfg))
            return stream.value, again.value

    stream, again = asyncio.run(scenario())
    assert stream.code() == grpc.StatusCode.PERMISSION_DENIED
    assert again.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is revoked" in (again.details() or "")


async def _stream_error(
    pki: PkiFiles,
    verifier: RunningVerifier,
    agent: Agent,
    messages: list[attestation_pb2.AgentMessage],
) -> grpc.aio.AioRpcError:
    async with stream_channel(pki, verifier, agent.enrollment) as channel:
        call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # noqa: PT012
            for message in messages:
                await call.write(message)
            while True:
                await call.read()
        return err.value


def test_protocol_violations_and_oversized_messages_are_clear_errors(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)
    hello = attestation_pb2.AgentMessage(hello=attestation_pb2.Hello())
    big = attestation_pb2.AgentMessage(
        evidence=attestation_pb2.Evidence(body=b"\x00" * (5 * 1024 * 1024))
    )
    cases = {
        "no hello first": [
            attestation_pb2.AgentMessage(
                posture_changed=attestation_pb2.PostureChanged(signals=["x"])
            )
        ],
        "hello twice": [hello, hello],
        "empty message": [hello, attestation_pb2.AgentMessage()],
        "oversized": [hello, big],
    }

    async def scenario() -> dict[str, grpc.aio.AioRpcError]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            errors = {
                name: await _stream_error(pki, verifier, agent, msgs)
                for name, msgs in cases.items()
            }
            # Still serving: the same device attests normally afterwards.
            [result] = await first_results(agent)
            assert result.trust.tier is Tier.AFFIRMING
            return errors

    errors = asyncio.run(scenario())
    assert errors["no hello first"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message on an attestation stream must be Hello" in (
        errors["no hello first"].details() or ""
    )
    assert "Hello sent twice" in (errors["hello twice"].details() or "")
    assert "empty AgentMessage" in (errors["empty message"].details() or "")
    assert errors["oversized"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_dead_tpm_is_a_clear_error() -> None:
    from devtrust.agent.errors import TpmError
    from devtrust.agent.tpm import TpmBackend

    backend = TpmBackend("swtpm:host=127.0.0.1,port=9")  # nothing listens there
    with pytest.raises(
        TpmError, match=re.escape("cannot open TPM at 'swtpm:host=127.0.0.1,port=9'")
    ):
        backend.ak_public()


@dataclass(frozen=True)
class _QueryAnswers:
    """What the operator read back in ``test_query_filters_pages_and_staleness``."""

    affirming: query_pb2.ListDevicesResponse
    none: query_pb2.ListDevicesResponse
    zone: query_pb2.ListDevicesResponse
    pages: list[str]
    missing: grpc.aio.AioRpcError
    ids: tuple[DeviceId, DeviceId]


def test_query_filters_pages_and_staleness(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """Two devices, one appraised and one enrolled only; a verifier clock pushed past the
    staleness bound turns the appraised one's tier to none."""
    from dataclasses import replace

    from devtrust.verifier.config import AttestationConfig

    tpms = [swtpm_factory(), swtpm_factory()]
    config = replace(
        verifier_config(workdir, pki, endorsement_ca),
        attestation=AttestationConfig(interval_s=30.0, staleness_s=60.0),
    )

    async def scenario() -> _QueryAnswers:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpms[0], "a") as a,
            enrolled_agent(workdir, pki, verifier, tpms[1], "b") as b,
        ):
            await first_results(a)
            channel, query = operator_stub(pki, verifier, workdir)
            async with channel:
                affirming = await query.ListDevices(
                    query_pb2.ListDevicesRequest(tier=common_pb2.TIER_AFFIRMING), timeout=5
                )
                none = await query.ListDevices(
                    query_pb2.ListDevicesRequest(tier=common_pb2.TIER_NONE), timeout=5
                )
                zone = await query.ListDevices(
                    query_pb2.ListDevicesRequest(zone="production-inference"), timeout=5
                )
                page = await query.ListDevices(query_pb2.ListDevicesRequest(page_size=1), timeout=5)
                rest = await query.ListDevices(
                    query_pb2.ListDevicesRequest(page_size=1, page_token=page.next_page_token),
                    timeout=5,
                )
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await query.GetDevice(query_pb2.GetDeviceRequest(device_id="nope"), timeout=5)
            return _QueryAnswers(
                affirming=affirming,
                none=none,
                zone=zone,
                pages=[d.device_id for d in (*page.devices, *rest.devices)],
                missing=missing.value,
                ids=(DeviceId(a.enrollment.device_id), DeviceId(b.enrollment.device_id)),
            )

    out = asyncio.run(scenario())
    appraised, enrolled = out.ids
    assert [d.device_id for d in out.affirming.devices] == [appraised]
    assert [d.device_id for d in out.none.devices] == [enrolled]
    assert list(out.zone.devices) == []
    assert sorted(out.pages) == sorted([appraised, enrolled])
    assert out.missing.code() == grpc.StatusCode.NOT_FOUND

    # Later, past the staleness bound: the stored result reads as tier none.
    result = with_repos(config.database, lambda repos: repos.trust.latest(appraised))
    assert result is not None
    later = result.appraised_at + datetime.timedelta(seconds=61)
    assert result.at(later).tier.label == "none"


def test_pending_device_and_foreign_trust_domain_cannot_attest(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from devtrust.verifier.ca import CertificateAuthority, pem
    from devtrust.verifier.records import DeviceState

    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)
    now = datetime.datetime.now(datetime.UTC)

    async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            device_id = DeviceId(agent.enrollment.device_id)
            target = f"127.0.0.1:{verifier.attestation_port}"
            # The right CA and the right device, but another trust domain.
            ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
            key = ec.generate_private_key(ec.SECP256R1())
            other = ca.issue_client(
                kind="agent",
                trust_domain="elsewhere.example",
                name=device_id,
                public_key=key.public_key(),
                now=now,
                lifetime=datetime.timedelta(hours=1),
            )
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            foreign = await _try_attest(
                target, channel_credentials(pki, key_pem=key_pem, cert_pem=pem(other))
            )
            await verifier.repos.devices.set_state(
                device_id, DeviceState.PENDING_APPROVAL, now=now, event="test"
            )
            async with stream_channel(pki, verifier, agent.enrollment) as channel:
                call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as pending:  # noqa: PT012
                    await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
                    await call.read()
            return foreign, pending.value

    foreign, pending = asyncio.run(scenario())
    assert foreign.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not a agent identity of devtrust.local" in (foreign.details() or "")
    assert pending.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "awaits operator approval" in (pending.details() or "")


def test_an_expired_credential_challenge_is_refused(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    from devtrust.agent.evidence import host_facts
    from devtrust.agent.tpm import TpmBackend
    from devtrust.core.binding import proof_for
    from devtrust.v1 import enrollment_pb2, enrollment_pb2_grpc

    skew = [datetime.timedelta(0)]

    def clock() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + skew[0]

    backend = TpmBackend(swtpm_factory().tcti)
    channel_key = spki(new_key())
    request = enrollment_pb2.EnrollRequest(
        ek_certificate=backend.ek_certificate() or b"",
        ek_public=backend.ek_public(),
        ak_public=backend.ak_public(),
        host=host_facts(),
        channel_key_spki=channel_key,
    )

    async def scenario() -> grpc.aio.AioRpcError:
        async with (
            running(verifier_config(workdir, pki, endorsement_ca), clock) as verifier,
            grpc.aio.secure_channel(
                f"127.0.0.1:{verifier.enrollment_port}", channel_credentials(pki)
            ) as channel,
        ):
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            challenge = await stub.Enroll(request, timeout=10)
            secret = backend.activate_credential(
                challenge.credential_blob, challenge.encrypted_secret
            )
            skew[0] = datetime.timedelta(minutes=6)  # past the five-minute challenge
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Activate(
                    enrollment_pb2.ActivateRequest(
                        enrollment_id=challenge.enrollment_id,
                        proof=proof_for(secret, challenge.enrollment_id, channel_key),
                    ),
                    timeout=10,
                )
            return late.value

    try:
        late = asyncio.run(scenario())
    finally:
        backend.close()
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in (late.details() or "")


def test_agent_reconnects_when_the_call_ends_while_it_writes(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    """A verifier restart can end the call between reading a challenge and writing the
    evidence: grpc.aio then raises InvalidStateError, not an RPC error. The agent must
    reconnect, not die (seen once in CI-like runs of the restart test)."""
    tpm = swtpm_factory()
    config = verifier_config(workdir, pki, endorsement_ca)

    async def scenario() -> list[AttestationResult]:
        async with (
            running(config) as verifier,
            enrolled_agent(workdir, pki, verifier, tpm) as agent,
        ):
            client = agent.client()
            real, calls = client.session, []

            async def flaky_session() -> None:
                calls.append(1)
                if len(calls) == 1:
                    raise asyncio.InvalidStateError("RPC already finished.")
                await real()

            # mypy refuses assigning to a method; this instance's one call is replaced on purpose.
            client.session = flaky_session  # type: ignore[method-assign]
            results: list[AttestationResult] = []
            client._on_result = results.append
            stop = asyncio.Event()
            task = asyncio.create_task(client.run(stop))
            for _ in range(200):
                if results or task.done():
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await task
            return results

    results = asyncio.run(scenario())
    assert results
    assert results[0].trust.tier is Tier.AFFIRMING
