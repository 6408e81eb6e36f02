"""Assemble and run the verifier: two grpc.aio servers.

- the enrollment port: TLS with a server certificate only (devices have no certificate yet);
  it serves Enrollment and gRPC health (load balancers' probes);
- the attestation port: mTLS only, client certificates must chain to the devtrust CA; it
  serves Attestation (agent identities), Query and Revocations (operator identities), gRPC
  health and server reflection.
Two servers, not two ports on one, so that no service is reachable on the wrong port. Who
may call each method is one table (verifier/authz.py), enforced on both by one interceptor.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from devtrust.core.errors import ConfigError
from devtrust.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)
from devtrust.verifier.attest_service import AttestationService
from devtrust.verifier.attestor import Attestor
from devtrust.verifier.authz import Authorization, Authorizer, uncovered
from devtrust.verifier.ca import pem
from devtrust.verifier.config import DEFAULT_ROOTS, VerifierConfig, parse_address
from devtrust.verifier.decision import LogSink, Sinks
from devtrust.verifier.device_pki import load_device_issuers
from devtrust.verifier.endorsement import EndorsementStore, load_certificates
from devtrust.verifier.enroll_service import EnrollmentService
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.interceptor import ErrorMapping
from devtrust.verifier.inventory import Inventory
from devtrust.verifier.pki import check_server_issued_by, load_ca, read_server_credentials
from devtrust.verifier.policy import PolicyError, PolicyHolder
from devtrust.verifier.query_service import QueryService
from devtrust.verifier.refs import ReferenceValues
from devtrust.verifier.revocation import RevocationSink, Revoker
from devtrust.verifier.revocation_service import RevocationService
from devtrust.verifier.settings import Settings
from devtrust.verifier.storage import Repositories, StoreSink, open_repositories
from devtrust.verifier.watch import TrustWatch

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_endorsements(config: VerifierConfig) -> EndorsementStore:
    """The endorsement store from ``endorsement.roots`` (and the swtpm local CA where set).
    A configured path that does not exist is an error naming it, never dropped."""
    paths = list(config.endorsement.roots)
    for path in paths:
        if not path.exists():
            raise ConfigError(
                f"endorsement root {path} does not exist: fix `endorsement.roots:` in the "
                f"configuration, or leave it out to use the roots shipped with devtrust "
                f"({DEFAULT_ROOTS})"
            )
    local_ca = config.endorsement.trust_swtpm_local_ca
    if local_ca is not None:
        if not local_ca.is_file():
            raise ConfigError(
                f"swtpm local CA {local_ca} does not exist: fix or remove "
                "`endorsement.trust_swtpm_local_ca:` in the configuration"
            )
        _check_local_ca(local_ca)
        logger.warning(
            "trusting swtpm local CA %s as an endorsement root: software TPMs will "
            "enroll (test and demo setting)",
            local_ca,
        )
        paths.append(local_ca)
    store = EndorsementStore.from_paths(paths)
    logger.info("endorsement roots: %d from %s", len(store.roots), ", ".join(str(p) for p in paths))
    return store


def _check_local_ca(path: Path) -> None:
    """The swtpm local CA must hold a certificate: one that holds none would be logged as
    trusted and trust nothing."""
    try:
        data = path.read_bytes()
        certs = load_certificates(data, source=str(path)) if data.strip() else []
    except OSError as exc:
        raise ConfigError(
            f"swtpm local CA {path}: {exc.strerror}: `endorsement.trust_swtpm_local_ca:` "
            "must name a readable file"
        ) from exc
    except MalformedInput:
        certs = []
    if not certs:
        raise ConfigError(
            f"swtpm local CA {path} holds no certificate (PEM or DER): give the swtpm "
            "local CA's certificate (issuercert.pem), or remove "
            "`endorsement.trust_swtpm_local_ca:` from the configuration"
        )


@dataclass
class RunningVerifier:
    enrollment_server: grpc.aio.Server
    attestation_server: grpc.aio.Server
    enrollment_port: int
    attestation_port: int
    repos: Repositories
    policy: PolicyHolder
    attestation: AttestationService
    revoker: Revoker
    watch: TrustWatch = field(default_factory=TrustWatch)
    # The services each port serves (full names): every method has a row in authz's table.
    services: dict[str, tuple[str, ...]] = field(default_factory=dict)
    started: list[grpc.aio.Server] = field(default_factory=list)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop what was started (grpc refuses to stop a server that never started), let
        appraisals in flight finish writing, then close the store."""
        self.watch.close()  # watchers get what is queued, then their streams end
        for server in self.started:
            await server.stop(grace)
        self.started.clear()
        await self.attestation.aclose()
        await self.revoker.aclose()
        await self.repos.close()

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
        # gRPC sets SO_REUSEPORT by default: a second verifier would bind the same port and
        # the kernel would split connections between the two (issue 8).
        ("grpc.so_reuseport", 0),
    ]


def _bind_problem(address: str, key: str) -> str | None:
    """Why ``address`` cannot be listened on and what to do, or None. Tried with a plain
    socket before gRPC, whose own failure says neither why nor what to do (it stays as the
    backstop)."""
    host, port = parse_address(address)
    change = f"change `{key}:` in the configuration"
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}: {change}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        "address already in use (is another devtrust-verifier running?): "
                        f"stop what holds it, or {change}"
                    )
                if exc.errno == errno.EACCES and port < 1024:
                    return (
                        f"port {port} is privileged: {change} to a port above 1023, or give "
                        "the verifier CAP_NET_BIND_SERVICE"
                    )
                return f"{exc.strerror or exc}: {change} to an address of this host"
    return None


def _listen(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials, key: str) -> int:
    problem = _bind_problem(address, key)
    if problem is None:
        try:
            return server.add_secure_port(address, creds)
        except RuntimeError:
            problem = f"gRPC could not bind it: change `{key}:` in the configuration"
    raise ConfigError(f"cannot listen on {address} ({key}): {problem}")


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


# Every service the verifier may register, by full name: their descriptors.
_SERVICES = {
    service.full_name: service
    for module in (attestation_pb2, enrollment_pb2, query_pb2, health_pb2, reflection_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}


def _check_covered(services: dict[str, tuple[str, ...]]) -> None:
    """Refuse to start with a registered method that has no row in verifier/authz.py's
    table (its interceptor would refuse every call of it anyway)."""
    names = [name for port in services.values() for name in port]
    unknown = [name for name in names if name not in _SERVICES]
    missing = unknown + uncovered(_SERVICES[name] for name in names if name in _SERVICES)
    if missing:
        raise RuntimeError(f"served without a row in verifier/authz.py: {', '.join(missing)}")


async def start_verifier(config: VerifierConfig, *, clock: Clock = utcnow) -> RunningVerifier:
    settings = Settings.from_config(config)
    ca = load_ca(config.ca.cert, config.ca.key)
    endorsements = load_endorsements(config)
    server_cert, server_key = read_server_credentials(config.tls.server_cert, config.tls.server_key)
    check_server_issued_by(server_cert, config.tls.server_cert, ca, config.ca.cert)
    # Device certificates come from CAs of their own, beside the CA (verifier/ca.py).
    issuers = load_device_issuers(
        config.ca.cert.parent,
        verifier_ca=ca.cert,
        device_lifetime=settings.certificates.device_lifetime,
        clock=clock,
    )
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
    repos = await open_repositories(config.database)
    # Who may call what: one table, one interceptor for both ports (verifier/authz.py); it
    # runs inside ErrorMapping, which maps its refusals to status codes.
    authorizer = Authorizer(
        trust_domain=settings.trust_domain,
        configured=config.roles,
        roles=repos.roles,
        devices=repos.devices,
    )
    interceptors = [ErrorMapping(), Authorization(authorizer)]
    inventory = (
        Inventory.load(settings.enrollment.inventory)
        if settings.enrollment.inventory is not None
        else None
    )

    enroll = grpc.aio.server(interceptors=interceptors, options=_options(config))
    enrollment = EnrollmentService(
        repos=repos,
        endorsements=endorsements,
        ca=ca,
        settings=settings.enrollment,
        certificates=settings.certificates,
        limits=settings.limits,
        clock=clock,
        inventory=inventory,
    )
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(enrollment, enroll)
    # Health on the TLS port too, for load balancers' probes (no client certificate).
    enroll_health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(enroll_health, enroll)
    enroll_names = [
        enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    ]
    tls = grpc.ssl_server_credentials([(server_key, server_cert)])

    attest = grpc.aio.server(interceptors=interceptors, options=_options(config))
    attestor = Attestor(
        issuers=issuers,
        attestation=settings.attestation,
        certificates=settings.certificates,
        limits=settings.limits,
        refs=refs,
        policy=policy,
    )
    watch = TrustWatch()
    revoker = Revoker(
        revocations=repos.revocations,
        # The CA that signs device certificates signs their CRL.
        signer=issuers,
        settings=settings.revocation,
        clock=clock,
    )
    attestation = AttestationService(
        repos=repos,
        attestor=attestor,
        # The store first: a Result reaches the agent only once its decision is committed.
        # Revocation after the store: a device whose tier fell loses its live certificates
        # before its Result (which names them) is sent.
        # The trust watch after both: what it sends is stored.
        sinks=Sinks(
            [StoreSink(repos), RevocationSink(revoker, settings.certificates), watch, LogSink()]
        ),
        settings=settings.attestation,
        limits=settings.limits,
        clock=clock,
    )
    attestation_pb2_grpc.add_AttestationServicer_to_server(attestation, attest)
    query_pb2_grpc.add_RevocationsServicer_to_server(RevocationService(revoker), attest)
    query_pb2_grpc.add_QueryServicer_to_server(
        QueryService(
            repos=repos,
            settings=settings.query,
            clock=clock,
            policy=policy,
            watch=watch,
            revoker=revoker,
            inventory=inventory,
            operators=config.roles,
            ca=ca,
        ),
        attest,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, attest)
    names = [
        attestation_pb2.DESCRIPTOR.services_by_name["Attestation"].full_name,
        query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        query_pb2.DESCRIPTOR.services_by_name["Revocations"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, attest)
    services = {"enrollment": tuple(enroll_names), "attestation": tuple(names)}
    _check_covered(services)
    mtls = grpc.ssl_server_credentials(
        [(server_key, server_cert)], root_certificates=pem(ca.cert), require_client_auth=True
    )
    running = RunningVerifier(
        enroll, attest, 0, 0, repos, policy, attestation, revoker, watch, services
    )
    try:
        await revoker.start()  # the live revocations and the first CRL, before serving
        await enrollment.start()  # the inventory, before any device enrolls
        running.enrollment_port = _listen(
            enroll, config.listen.enrollment, tls, "listen.enrollment"
        )
        running.attestation_port = _listen(
            attest, config.listen.attestation, mtls, "listen.attestation"
        )
        for server in (enroll, attest):
            await _start(server, running)
        for name in names[:2]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in ("", enroll_names[0]):
            await enroll_health.set(name, health_pb2.HealthCheckResponse.SERVING)
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
