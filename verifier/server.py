"""Assemble and run the verifier: two grpc.aio servers.

- the enrollment port: TLS with a server certificate only (devices have no certificate yet);
- the attestation port: mTLS only, client certificates must chain to the devtrust CA; it
  serves Attestation (agent identities), Query (operator identities), gRPC health and
  server reflection.
Two servers, not two ports on one, so that no service is reachable on the wrong port.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.devtrust.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    enrollment_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)
from verifier.attest_service import AttestationService
from verifier.ca import CertificateAuthority, pem
from verifier.config import VerifierConfig
from verifier.endorsement import EndorsementStore
from verifier.enroll_service import EnrollmentService
from verifier.errors import ConfigError
from verifier.interceptor import ErrorMapping
from verifier.policy import PolicyError, PolicyHolder
from verifier.query_service import QueryService
from verifier.refs import ReferenceValues
from verifier.store import Store

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from exc


def load_endorsements(config: VerifierConfig) -> EndorsementStore:
    paths = [p for p in config.endorsement.roots if p.exists()]
    local_ca = config.endorsement.trust_swtpm_local_ca
    if local_ca is not None:
        logger.warning(
            "trusting swtpm local CA %s as an endorsement root: software TPMs will "
            "enroll (test and demo setting)",
            local_ca,
        )
        paths.append(local_ca)
    store = EndorsementStore.from_paths(paths)
    logger.info(
        "endorsement roots: %d from %s", len(store.roots), ", ".join(sorted(set(store.sources)))
    )
    return store


@dataclass
class RunningVerifier:
    enrollment_server: grpc.aio.Server
    attestation_server: grpc.aio.Server
    enrollment_port: int
    attestation_port: int
    store: Store
    policy: PolicyHolder
    attestation: AttestationService
    started: list[grpc.aio.Server] = field(default_factory=list)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop what was started (grpc refuses to stop a server that never started), let
        appraisals in flight finish writing, then close the store."""
        for server in self.started:
            await server.stop(grace)
        self.started.clear()
        await asyncio.to_thread(self.attestation.close)
        self.store.close()

    async def wait(self) -> None:
        await self.attestation_server.wait_for_termination()


def _options(config: VerifierConfig) -> list[tuple[str, int]]:
    limit = config.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def _start(server: grpc.aio.Server, running: RunningVerifier) -> None:
    """Start a server even when cancelled meanwhile: grpc cannot stop a half-started server,
    so a cancellation waits for the start to finish, then is re-raised (and stops it)."""
    start = asyncio.ensure_future(server.start())
    try:
        await asyncio.shield(start)
    except asyncio.CancelledError:
        await start
        running.started.append(server)
        raise
    running.started.append(server)


async def start_verifier(config: VerifierConfig, *, clock: Clock = utcnow) -> RunningVerifier:
    ca = CertificateAuthority.load(config.ca.cert, config.ca.key)
    endorsements = load_endorsements(config)
    server_cert = _read(config.tls.server_cert, "server certificate")
    server_key = _read(config.tls.server_key, "server key")
    refs = ReferenceValues.load(config.reference_values) if config.reference_values else None
    if refs is not None:
        logger.info(
            "reference values: %d groups from %s", len(refs.groups), config.reference_values
        )
    try:
        policy = PolicyHolder(config.policy)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from exc
    if policy.current is not None:
        logger.info(
            "policy %s: %d rules from %s",
            policy.current.policy_id,
            len(policy.current.rules),
            config.policy,
        )
    else:
        logger.warning("no posture and GPU policy: only TPM evidence is appraised")
    store = Store(config.database)
    interceptors = [ErrorMapping()]

    enroll = grpc.aio.server(interceptors=interceptors, options=_options(config))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(
        EnrollmentService(
            store=store, endorsements=endorsements, ca=ca, config=config, clock=clock
        ),
        enroll,
    )
    tls = grpc.ssl_server_credentials([(server_key, server_cert)])

    attest = grpc.aio.server(interceptors=interceptors, options=_options(config))
    attestation = AttestationService(
        store=store, ca=ca, config=config, clock=clock, refs=refs, policy=policy
    )
    attestation_pb2_grpc.add_AttestationServicer_to_server(attestation, attest)
    query_pb2_grpc.add_QueryServicer_to_server(
        QueryService(store=store, config=config, clock=clock, policy=policy), attest
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, attest)
    names = [
        attestation_pb2.DESCRIPTOR.services_by_name["Attestation"].full_name,
        query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, attest)
    mtls = grpc.ssl_server_credentials(
        [(server_key, server_cert)], root_certificates=pem(ca.cert), require_client_auth=True
    )
    running = RunningVerifier(enroll, attest, 0, 0, store, policy, attestation)
    try:
        try:
            running.enrollment_port = enroll.add_secure_port(config.listen.enrollment, tls)
            running.attestation_port = attest.add_secure_port(config.listen.attestation, mtls)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot listen on {config.listen.enrollment} / {config.listen.attestation}: {exc}"
            ) from exc
        for server in (enroll, attest):
            await _start(server, running)
        for name in names[:2]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    except BaseException:  # a failed or interrupted start leaves nothing listening
        await running.stop(grace=None)
        raise
    logger.info(
        "verifier listening: enrollment (TLS) on %s, attestation+query (mTLS) on %s, database %s",
        running.enrollment_port,
        running.attestation_port,
        config.database,
    )
    return running
