"""Test environments: a running verifier on loopback with real mTLS and a real SQLite file,
agents over real swtpm processes, and helpers to drive the wire protocol by hand."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.agent.attest import AttestationClient, ResultCallback
from devtrust.agent.config import AgentConfig, TpmConfig, VerifierEndpoint
from devtrust.agent.enroll import enroll
from devtrust.agent.evidence import evidence_body, host_facts
from devtrust.agent.main import make_host, make_tpm
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import AgentFiles, Enrollment, new_key, spki
from devtrust.agent.tpm import AsyncTpm
from devtrust.core.binding import qualifying_data, sign_possession
from devtrust.swtpm import EndorsementCA, Swtpm
from devtrust.swtpm.bootlog import header_only_log
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2, query_pb2_grpc
from devtrust.verifier.ca import CertificateAuthority, pem
from devtrust.verifier.config import (
    AttestationConfig,
    CaConfig,
    EndorsementConfig,
    GpuConfig,
    ListenConfig,
    TlsConfig,
    VerifierConfig,
)
from devtrust.verifier.pki import PkiFiles, issue_operator
from devtrust.verifier.server import RunningVerifier, start_verifier


def verifier_config(
    workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA, **attestation: Any
) -> VerifierConfig:
    return VerifierConfig(
        database=workdir / "verifier.db",
        listen=ListenConfig(enrollment="127.0.0.1:0", attestation="127.0.0.1:0"),
        tls=TlsConfig(server_cert=pki.server_cert, server_key=pki.server_key),
        ca=CaConfig(cert=pki.ca_cert, key=pki.ca_key),
        endorsement=EndorsementConfig(roots=[], trust_swtpm_local_ca=ek_ca.cert_path),
        # Tests reconnect at once; the gap between a device's streams has a test of its own.
        attestation=AttestationConfig(
            **{"interval_s": 30.0, "stream_challenge_gap_s": 0.0, **attestation}
        ),
        policy=None,  # tests of TPM evidence; policy tests name theirs
        # NVIDIA's roots as shipped; a RIM store of the test's own (empty until a test adds).
        gpu=GpuConfig(rim_store=workdir / "rims"),
        # operator_stub's operator: every Query method (tests/test_authz.py tests the roles).
        operators={"alice": "admin"},
    )


@asynccontextmanager
async def running(
    config: VerifierConfig, clock: Callable[[], datetime.datetime] | None = None
) -> AsyncIterator[RunningVerifier]:
    verifier = await (start_verifier(config, clock=clock) if clock else start_verifier(config))
    try:
        yield verifier
    finally:
        await verifier.stop(grace=None)


def agent_config(
    workdir: Path, pki: PkiFiles, verifier: RunningVerifier, tpm: Swtpm, name: str = "agent"
) -> AgentConfig:
    return AgentConfig(
        verifier=VerifierEndpoint(
            enrollment=f"127.0.0.1:{verifier.enrollment_port}",
            attestation=f"127.0.0.1:{verifier.attestation_port}",
            ca_bundle=pki.ca_cert,
        ),
        tpm=TpmConfig(tcti=tpm.tcti),
        state_dir=workdir / name / "state",
        runtime_dir=workdir / name / "run",
        # A log without measurements: it replays to a fresh swtpm's PCRs 0-7. Without any
        # log the verifier reports eventlog.missing (issue 7, item 3).
        event_log=header_only_log(workdir / name / "event-log.bin"),
        gpu_source="none",
        rpc_timeout_s=10.0,
        reconnect_max_s=1.0,
    )


@dataclass
class Agent:
    cfg: AgentConfig
    tpm: AsyncTpm
    files: AgentFiles
    enrollment: Enrollment

    def client(self, *, on_result: ResultCallback | None = None) -> AttestationClient:
        """The real attestation client over this agent's TPM and files, with a host probe
        made from the configuration as it is now (tests change it between clients)."""
        return AttestationClient(
            self.cfg,
            tpm=self.tpm,
            host=make_host(self.cfg),
            files=self.files,
            enrollment=self.enrollment,
            on_result=on_result,
        )

    def retarget(self, verifier: RunningVerifier) -> None:
        self.cfg = replace(
            self.cfg,
            verifier=replace(
                self.cfg.verifier,
                enrollment=f"127.0.0.1:{verifier.enrollment_port}",
                attestation=f"127.0.0.1:{verifier.attestation_port}",
            ),
        )


@asynccontextmanager
async def enrolled_agent(
    workdir: Path, pki: PkiFiles, verifier: RunningVerifier, tpm: Swtpm, name: str = "agent"
) -> AsyncIterator[Agent]:
    cfg = agent_config(workdir, pki, verifier, tpm, name)
    atpm = make_tpm(cfg)
    files = AgentFiles(cfg.state_dir, cfg.runtime_dir)
    try:
        enrollment = await enroll(cfg, atpm, files, host=make_host(cfg))
        yield Agent(cfg, atpm, files, enrollment)
    finally:
        atpm.close()


async def first_results(
    agent: Agent,
    count: int = 1,
    limit_s: float = 20.0,
) -> list[AttestationResult]:
    """Run the real attestation client until ``count`` results arrived."""
    results: list[AttestationResult] = []
    done = asyncio.Event()

    def on_result(result: AttestationResult) -> None:
        results.append(result)
        if len(results) >= count:
            done.set()

    stop = asyncio.Event()
    client = agent.client(on_result=on_result)
    task = asyncio.create_task(client.run(stop))
    try:
        await asyncio.wait_for(done.wait(), limit_s)
    finally:
        stop.set()
        await task
    return results


def channel_credentials(
    pki: PkiFiles, *, key_pem: bytes | None = None, cert_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(pki.ca_cert.read_bytes(), key_pem, cert_pem)


def stream_channel(
    pki: PkiFiles,
    verifier: RunningVerifier,
    enrollment: Enrollment,
) -> grpc.aio.Channel:
    creds = channel_credentials(
        pki, key_pem=enrollment.channel_key_pem, cert_pem=enrollment.channel_cert_pem
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{verifier.attestation_port}", creds)


def operator_stub(
    pki: PkiFiles,
    verifier: RunningVerifier,
    workdir: Path,
    trust_domain: str = "devtrust.local",
) -> tuple[grpc.aio.Channel, query_pb2_grpc.QueryAsyncStub]:
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    cert, key = issue_operator(
        ca,
        workdir,
        name="alice",
        trust_domain=trust_domain,
        now=datetime.datetime.now(datetime.UTC),
    )
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{verifier.attestation_port}",
        channel_credentials(pki, key_pem=key.read_bytes(), cert_pem=cert.read_bytes()),
    )
    return channel, query_pb2_grpc.QueryStub(channel)


def foreign_client_identity(spiffe_kind: str, name: str) -> tuple[bytes, bytes]:
    """A key and certificate with a plausible SPIFFE ID from a CA the verifier never saw."""
    now = datetime.datetime.now(datetime.UTC)
    rogue = CertificateAuthority.create(common_name="devtrust verifier CA", now=now)
    key = ec.generate_private_key(ec.SECP256R1())
    if spiffe_kind == "agent":
        cert = rogue.issue_client(
            kind="agent",
            trust_domain="devtrust.local",
            name=name,
            public_key=key.public_key(),
            now=now,
            lifetime=datetime.timedelta(hours=1),
        )
    else:
        cert = rogue.issue_client(
            kind="operator",
            trust_domain="devtrust.local",
            name=name,
            public_key=key.public_key(),
            now=now,
            lifetime=datetime.timedelta(hours=1),
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, pem(cert)


# --- driving the attestation stream by hand ---------------------------------------------

AttestStream = grpc.aio.StreamStreamCall[
    attestation_pb2.AgentMessage, attestation_pb2.VerifierMessage
]


async def read_message(call: AttestStream) -> attestation_pb2.VerifierMessage:
    """The verifier's next message on ``call``; the stream ending cleanly instead (EOF) fails
    the test here, where it happened."""
    msg = await call.read()
    assert isinstance(msg, attestation_pb2.VerifierMessage), "the verifier ended the stream"
    return msg


async def manual_stream(
    pki: PkiFiles,
    verifier: RunningVerifier,
    agent: Agent,
    build: Callable[[attestation_pb2.Challenge], Awaitable[attestation_pb2.Evidence]],
) -> attestation_pb2.VerifierMessage:
    """Open a stream with the agent's channel identity and answer the first challenge with
    evidence made by ``build(challenge) -> Evidence``; return the verifier's reply."""
    async with stream_channel(pki, verifier, agent.enrollment) as channel:
        call = attestation_pb2_grpc.AttestationStub(channel).Attest(timeout=15)
        await call.write(attestation_pb2.AgentMessage(hello=attestation_pb2.Hello()))
        first = await call.read()
        assert isinstance(first, attestation_pb2.VerifierMessage)
        evidence = await build(first.challenge)
        await call.write(attestation_pb2.AgentMessage(evidence=evidence))
        reply = await call.read()
        call.cancel()
        assert isinstance(reply, attestation_pb2.VerifierMessage)
        return reply


async def quote_evidence(
    agent: Agent,
    challenge: attestation_pb2.Challenge,
    *,
    quoted_nonce: bytes | None = None,
    body: bytes | None = None,
    sent_body: bytes | None = None,
) -> attestation_pb2.Evidence:
    """Evidence made by the real TPM, optionally with the quote answering ``quoted_nonce``
    or the body swapped after quoting. The body asks for a certificate of a fresh key, with
    its proof of possession."""
    if body is None:
        key = new_key()
        body = evidence_body(
            host=host_facts(),
            certify_key_spki=spki(key),
            certify_key_proof=sign_possession(key, challenge.nonce, agent.enrollment.device_id),
            now=datetime.datetime.now(datetime.UTC),
        )
    nonce = quoted_nonce or challenge.nonce
    selection = [(s.hash_alg, list(s.pcrs)) for s in challenge.pcr_selection]
    quote = await agent.tpm.quote(qualifying_data(nonce, body), selection)
    banks: dict[str, common_pb2.PcrBank] = {}
    for (bank, index), value in quote.pcrs.items():
        banks.setdefault(bank, common_pb2.PcrBank(hash_alg=bank)).values[index] = value
    evidence = attestation_pb2.Evidence(
        nonce=challenge.nonce,
        quote_attest=quote.attest,
        quote_signature=quote.signature,
        pcrs=list(banks.values()),
        body=sent_body or body,
    )
    # The event log, as the agent sends it when asked.
    if challenge.event_log.wanted and agent.cfg.event_log is not None:
        log = agent.cfg.event_log.read_bytes()
        start = challenge.event_log.from_offset
        evidence.event_log.CopyFrom(
            attestation_pb2.EventLogChunk(offset=start, data=log[start:], total_size=len(log))
        )
    return evidence
