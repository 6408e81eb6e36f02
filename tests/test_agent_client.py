"""The attestation client's logic, without swtpm (issue 9, item 6): an in-memory TPM double
and a recorded host (tests/agent_parts.py) drive the real ``AttestationClient`` against a
scripted verifier, a grpc.aio server on loopback with real mTLS from the tests' PKI.

Each stream the client opens runs the next script; a script reads what the agent sends and
writes what a verifier would, and a failed assertion in it fails the test.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.attest import AttestationClient, IdentityCallback
from devtrust.agent.collect import RecordedHost
from devtrust.agent.config import AgentConfig, VerifierEndpoint
from devtrust.agent.errors import TpmError
from devtrust.agent.interfaces import IdentityFiles
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import Enrollment, MemoryFiles, key_pem, new_key, spki
from devtrust.agent.tpm import TpmBackend
from devtrust.core.binding import possession_proven, qualifying_data
from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2
from devtrust.verifier.ca import CertificateAuthority, pem
from devtrust.verifier.pki import PkiFiles
from tests.agent_parts import ATTEST_PREFIX, FakeTpm, pcr_value, recorded_host

DEVICE = DeviceId("5e" * 32)
TRUST_DOMAIN = "devtrust.local"
NOW = datetime.datetime.now(datetime.UTC)
SELECTION = [common_pb2.PcrSelection(hash_alg="sha256", pcrs=[0, 7])]


class Peer:
    """One attestation stream, as the scripted verifier sees it."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def read(self) -> attestation_pb2.AgentMessage:
        msg = await asyncio.wait_for(self._context.read(), 10)
        assert isinstance(msg, attestation_pb2.AgentMessage), "the agent closed the stream"
        return msg

    async def write(self, msg: attestation_pb2.VerifierMessage) -> None:
        await self._context.write(msg)

    async def evidence(self, challenge: attestation_pb2.Challenge) -> attestation_pb2.Evidence:
        """Send ``challenge``; the Evidence that answers it."""
        await self.write(attestation_pb2.VerifierMessage(challenge=challenge))
        msg = await self.read()
        assert msg.WhichOneof("kind") == "evidence"
        return msg.evidence

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        await self._context.abort(code, details, trailing_metadata=trailing_metadata)

    def agent_identity(self) -> list[bytes]:
        return list(self._context.auth_context().get("x509_subject_alternative_name", []))


Script = Callable[[Peer], Awaitable[None]]


class ScriptedVerifier(attestation_pb2_grpc.AttestationServicer):
    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.streams = 0
        self.identities: list[list[bytes]] = []
        self.done = asyncio.Event()
        self.error: BaseException | None = None

    # The generated base declares a response iterator; like the verifier's servicer, this one
    # writes through the context and returns None, which grpc.aio allows.
    async def Attest(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[attestation_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        n, self.streams = self.streams, self.streams + 1
        peer = Peer(context)
        self.identities.append(peer.agent_identity())
        if n >= len(self.scripts):  # the test is over: hold the stream until it stops
            await asyncio.Event().wait()
        try:
            hello = await peer.read()
            assert hello.WhichOneof("kind") == "hello"
            await self.scripts[n](peer)
        except grpc.aio.AbortError:
            raise  # the script ended the call with an error on purpose
        except Exception as exc:
            self.error = exc
            self.done.set()
            raise
        if n == len(self.scripts) - 1:
            self.done.set()
            await asyncio.Event().wait()


def challenge(nonce: bytes, *, log: bool = False) -> attestation_pb2.Challenge:
    return attestation_pb2.Challenge(
        nonce=nonce,
        pcr_selection=SELECTION,
        event_log=attestation_pb2.EventLogRequest(wanted=log),
    )


def body_of(evidence: attestation_pb2.Evidence) -> attestation_pb2.EvidenceBody:
    return attestation_pb2.EvidenceBody.FromString(evidence.body)


def ca_of(pki: PkiFiles) -> CertificateAuthority:
    return CertificateAuthority.load(pki.ca_cert, pki.ca_key)


def certify(pki: PkiFiles, spki_der: bytes) -> common_pb2.DeviceCertificate:
    """A device certificate for the key an evidence body asked to certify."""
    public = serialization.load_der_public_key(spki_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cert = ca_of(pki).issue_device(
        trust_domain=TRUST_DOMAIN,
        device_id=DEVICE,
        public_key=public,
        claims=DeviceClaims(tier=Tier.AFFIRMING, zone=""),
        now=datetime.datetime.now(datetime.UTC),
        lifetime=datetime.timedelta(hours=1),
    )
    return common_pb2.DeviceCertificate(
        certificate_der=cert.public_bytes(serialization.Encoding.DER),
        serial_hex=f"{cert.serial_number:x}",
    )


def affirming(certificate: common_pb2.DeviceCertificate | None = None) -> attestation_pb2.Result:
    trust = common_pb2.TrustResult(device_id=DEVICE, tier=common_pb2.TIER_AFFIRMING, score=100)
    return attestation_pb2.Result(trust=trust, certificate=certificate)


def enrollment(pki: PkiFiles) -> Enrollment:
    """A channel identity issued by the tests' CA, as enrollment would have saved it."""
    key = new_key()
    cert = ca_of(pki).issue_client(
        trust_domain=TRUST_DOMAIN,
        kind="agent",
        name=DEVICE,
        public_key=key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(hours=1),
    )
    return Enrollment(DEVICE, key_pem(key), pem(cert), pki.ca_cert.read_bytes())


async def attest(
    pki: PkiFiles,
    scripts: list[Script],
    *,
    tmp_path: Path,
    tpm: FakeTpm | None = None,
    host: RecordedHost | None = None,
    files: IdentityFiles | None = None,
    results: list[AttestationResult] | None = None,
    on_identity: IdentityCallback | None = None,
) -> tuple[ScriptedVerifier, AttestationClient]:
    """Run the client against the scripts until the last one is done; re-raise what failed."""
    verifier = ScriptedVerifier(scripts)
    server = grpc.aio.server()
    attestation_pb2_grpc.add_AttestationServicer_to_server(verifier, server)
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    cfg = AgentConfig(
        verifier=VerifierEndpoint(
            enrollment=f"127.0.0.1:{port}",
            attestation=f"127.0.0.1:{port}",
            ca_bundle=pki.ca_cert,
        ),
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        rpc_timeout_s=5.0,
        reconnect_max_s=0.1,
    )
    client = AttestationClient(
        cfg,
        tpm=tpm or FakeTpm(),
        host=host or recorded_host(),
        files=files or MemoryFiles(),
        enrollment=enrollment(pki),
        on_result=None if results is None else results.append,
        on_identity=on_identity,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    try:
        await asyncio.wait_for(verifier.done.wait(), 20)
    finally:
        stop.set()
        await task
        await server.stop(None)
    if verifier.error is not None:
        raise verifier.error
    return verifier, client


# --- answering a challenge -------------------------------------------------------------------


def test_challenge_answered_with_the_nonce_bound_body(pki: PkiFiles, tmp_path: Path) -> None:
    tpm, host = FakeTpm(), recorded_host(event_log=b"0123456789")
    nonce = os.urandom(32)
    seen: list[attestation_pb2.Evidence] = []

    async def script(peer: Peer) -> None:
        seen.append(await peer.evidence(challenge(nonce, log=True)))

    verifier = asyncio.run(attest(pki, [script], tmp_path=tmp_path, tpm=tpm, host=host))[0]
    [evidence] = seen
    body = body_of(evidence)
    assert evidence.nonce == nonce
    # The quote binds this nonce and exactly the body sent.
    assert tpm.quoted == [qualifying_data(nonce, evidence.body)]
    assert evidence.quote_attest == ATTEST_PREFIX + qualifying_data(nonce, evidence.body)
    assert evidence.quote_signature == b"fake-signature"
    [bank] = evidence.pcrs
    assert bank.hash_alg == "sha256"
    assert dict(bank.values) == {0: pcr_value("sha256", 0), 7: pcr_value("sha256", 7)}
    # What the host reported, as recorded.
    assert body.host.hostname == "gpu-node-17"
    assert body.os.kernel_release == "6.8.0-45-generic"
    assert [g.uuid for g in body.gpu.gpus] == ["GPU-1"]
    assert evidence.event_log.data == b"0123456789"
    assert evidence.event_log.total_size == 10
    # No certificate yet: it asks for one, with a proof of possession for this nonce.
    public = serialization.load_der_public_key(body.certify_key_spki)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert possession_proven(public, body.certify_key_proof, nonce, DEVICE)
    # Over real mTLS, with the channel identity of its enrollment.
    assert verifier.identities == [[f"spiffe://{TRUST_DOMAIN}/agent/{DEVICE}".encode()]]


def test_event_log_from_the_offset_asked_and_whole_after_a_reboot(
    pki: PkiFiles, tmp_path: Path
) -> None:
    chunks: list[attestation_pb2.EventLogChunk] = []

    async def script(peer: Peer) -> None:
        for offset in (4, 10, 99):  # 99: past the end, so a new log (the host rebooted)
            req = challenge(os.urandom(32), log=True)
            req.event_log.from_offset = offset
            chunks.append((await peer.evidence(req)).event_log)

    host = recorded_host(event_log=b"0123456789")
    asyncio.run(attest(pki, [script], tmp_path=tmp_path, host=host))
    assert [(c.offset, c.data, c.total_size) for c in chunks] == [
        (4, b"456789", 10),
        (10, b"", 10),
        (0, b"0123456789", 10),
    ]


# --- results ---------------------------------------------------------------------------------


class _CountingFiles(MemoryFiles):
    reads = 0

    async def device_certificate(self) -> x509.Certificate | None:
        self.reads += 1
        return await super().device_certificate()


def test_result_and_next_challenge_in_one_message(pki: PkiFiles, tmp_path: Path) -> None:
    """The verifier sends a Result and the next Challenge together: the client stores the
    renewed certificate first, then answers, no longer asking for one."""
    files = _CountingFiles()
    results: list[AttestationResult] = []
    seen: list[tuple[attestation_pb2.Evidence, int, int]] = []
    second_nonce = os.urandom(32)

    async def script(peer: Peer) -> None:
        first = await peer.evidence(challenge(os.urandom(32)))
        certificate = certify(pki, body_of(first).certify_key_spki)
        await peer.write(
            attestation_pb2.VerifierMessage(
                result=affirming(certificate), challenge=challenge(second_nonce)
            )
        )
        msg = await peer.read()
        seen.append((msg.evidence, len(results), files.saved))
        third = await peer.evidence(challenge(os.urandom(32)))
        seen.append((third, len(results), files.saved))

    asyncio.run(attest(pki, [script], tmp_path=tmp_path, files=files, results=results))
    (second, results_then, saved_then), (third, _, _) = seen
    assert results_then == 1  # the Result was handled before the Challenge was answered
    assert saved_then == 1
    assert second.nonce == second_nonce
    assert not body_of(second).certify_key_spki  # renewed: nothing more to certify
    assert not body_of(third).certify_key_spki
    assert files.certificate is not None
    assert files.key is not None
    assert files.certificate.public_key() == files.key.public_key()
    # Read once at start; the renewal was kept in memory, not read back per challenge.
    assert files.reads == 1
    # What the callback got: the Result as a value, the tier a core Tier.
    [result] = results
    assert result.trust.tier is Tier.AFFIRMING
    assert result.certificate is not None
    assert result.certificate.certificate == files.certificate


def test_a_certificate_for_another_key_is_discarded(pki: PkiFiles, tmp_path: Path) -> None:
    files = MemoryFiles()
    seen: list[attestation_pb2.EvidenceBody] = []

    async def script(peer: Peer) -> None:
        first = body_of(await peer.evidence(challenge(os.urandom(32))))
        seen.append(first)
        stranger = certify(pki, spki(new_key()))
        await peer.write(
            attestation_pb2.VerifierMessage(
                result=affirming(stranger), challenge=challenge(os.urandom(32))
            )
        )
        seen.append(body_of((await peer.read()).evidence))

    asyncio.run(attest(pki, [script], tmp_path=tmp_path, files=files))
    first, second = seen
    assert files.saved == 0
    assert files.certificate is None
    assert second.certify_key_spki == first.certify_key_spki  # still asking for its own key


def test_a_due_certificate_is_renewed_and_a_fresh_one_is_not(pki: PkiFiles, tmp_path: Path) -> None:
    """``renew_at`` of the certificate read at start decides whether the first body asks."""
    key = new_key()
    public = spki(key)
    fresh = x509.load_der_x509_certificate(certify(pki, public).certificate_der)
    bodies: list[attestation_pb2.EvidenceBody] = []

    async def script(peer: Peer) -> None:
        bodies.append(body_of(await peer.evidence(challenge(os.urandom(32)))))

    files = MemoryFiles(certificate=fresh, key=key)
    asyncio.run(attest(pki, [script], tmp_path=tmp_path, files=files))
    assert not bodies[0].certify_key_spki
    # One issued an hour ago for an hour is past half its life.
    old = ca_of(pki).issue_device(
        trust_domain=TRUST_DOMAIN,
        device_id=DEVICE,
        public_key=key.public_key(),
        claims=DeviceClaims(tier=Tier.AFFIRMING, zone=""),
        now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=45),
        lifetime=datetime.timedelta(hours=1),
    )
    files = MemoryFiles(certificate=old, key=key)
    asyncio.run(attest(pki, [script], tmp_path=tmp_path / "again", files=files))
    assert bodies[1].certify_key_spki
    assert bodies[1].certify_key_spki != public  # a new key, never the old one again


# --- posture changes and reconnects -----------------------------------------------------------


def test_posture_change_forwarded_and_the_next_evidence_reports_it(
    pki: PkiFiles, tmp_path: Path
) -> None:
    host = recorded_host()
    changed = attestation_pb2.OsPosture(
        os_id="ubuntu", sshd=attestation_pb2.SshdSettings(permit_root_login="yes")
    )
    seen: list[object] = []

    async def script(peer: Peer) -> None:
        seen.append(body_of(await peer.evidence(challenge(os.urandom(32)))).os)
        host.change(["sshd_config"], posture=changed)
        note = await peer.read()
        assert note.WhichOneof("kind") == "posture_changed"
        seen.append(list(note.posture_changed.signals))
        seen.append(body_of(await peer.evidence(challenge(os.urandom(32)))).os)

    asyncio.run(attest(pki, [script], tmp_path=tmp_path, host=host))
    before, signals, after = seen
    assert isinstance(before, attestation_pb2.OsPosture)
    assert isinstance(after, attestation_pb2.OsPosture)
    assert before.sshd.permit_root_login == "no"
    assert signals == ["sshd_config"]
    assert after.sshd.permit_root_login == "yes"
    assert host.listeners == 0  # the client stopped listening when it stopped


def test_reconnects_after_the_verifier_ends_the_stream_or_fails(
    pki: PkiFiles, tmp_path: Path
) -> None:
    nonces: list[bytes] = []
    host = recorded_host()
    listening: list[int] = []

    async def closes(peer: Peer) -> None:
        listening.append(host.listeners)
        nonces.append((await peer.evidence(challenge(os.urandom(32)))).nonce)
        # Returning ends the call: a verifier restart, as the agent sees it.

    async def fails(peer: Peer) -> None:
        await peer.abort(grpc.StatusCode.UNAVAILABLE, "verifier shutting down")

    async def serves(peer: Peer) -> None:
        listening.append(host.listeners)
        nonces.append((await peer.evidence(challenge(os.urandom(32)))).nonce)

    verifier, _ = asyncio.run(attest(pki, [closes, fails, serves], tmp_path=tmp_path, host=host))
    assert verifier.streams == 3
    assert len(nonces) == 2
    assert listening == [1, 1]  # one subscription across streams, not one per stream
    assert host.listeners == 0


# --- the TPM module ---------------------------------------------------------------------------


def test_importing_the_tpm_module_leaves_the_environment_alone() -> None:
    """tpm2-tss is quietened where a TCTI opens, not by importing the module."""
    env = {k: v for k, v in os.environ.items() if k != "TSS2_LOG"}
    code = (
        "import os, devtrust.agent.tpm; assert 'TSS2_LOG' not in os.environ, os.environ['TSS2_LOG']"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_opening_a_tcti_quietens_tpm2_tss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TSS2_LOG", raising=False)
    with pytest.raises(TpmError):
        TpmBackend("swtpm:host=127.0.0.1,port=9").ak_public()  # nothing listens there
    assert os.environ["TSS2_LOG"] == "all+NONE"
