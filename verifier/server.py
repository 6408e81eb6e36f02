"""Assemble and run the verifier: two grpc.aio servers.

- the enrollment port: TLS with a server certificate only (devices have no certificate yet);
  it serves Enrollment and gRPC health (load balancers' probes);
- the attestation port: mTLS only, client certificates must chain to the devtrust CA; it
  serves Attestation (agent identities), Query and Revocations (operator identities), gRPC
  health and server reflection.
Two servers, not two ports on one, so that no service is reachable on the wrong port. Who
may call each method is one table (verifier/authz.py), enforced on both by one interceptor.

Faults that pass (issue 12): ``RunningVerifier.drain`` stops the verifier gracefully (SIGTERM:
health NOT_SERVING, streams told to reconnect elsewhere, then stop, within server.drain_s); a
database that stops answering turns health NOT_SERVING until it answers again
(verifier/store_health.py); every unary call is bounded (server.call_timeout_s) and every
connection kept alive or dropped by HTTP/2 keepalive (``_options``).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId
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
from devtrust.verifier.config import DEFAULT_ROOTS, VerifierConfig
from devtrust.verifier.decision import LogSink, Sinks
from devtrust.verifier.device_pki import load_device_issuers
from devtrust.verifier.endorsement import EndorsementStore, load_certificates
from devtrust.verifier.enroll_service import EnrollmentService
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.gpu.anchors import GpuAnchorsHolder
from devtrust.verifier.interceptor import ErrorMapping
from devtrust.verifier.inventory import Inventory
from devtrust.verifier.listen import bind_problem, listen, server_options
from devtrust.verifier.metrics import MetricsSink, open_metrics
from devtrust.verifier.pki import check_server_issued_by, load_ca, read_server_credentials
from devtrust.verifier.policy import PolicyError, PolicyHolder
from devtrust.verifier.policy_store import SharedPolicy
from devtrust.verifier.query_service import QueryService
from devtrust.verifier.refs import ReferenceValues
from devtrust.verifier.revocation import RevocationSink, Revoker
from devtrust.verifier.revocation_service import RevocationService
from devtrust.verifier.running import RunningVerifier
from devtrust.verifier.settings import Settings
from devtrust.verifier.storage import Repositories, StoreSink, open_repositories
from devtrust.verifier.storage.changes import ChangeFeed
from devtrust.verifier.store_health import StoreHealth
from devtrust.verifier.watch import TrustWatch

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_endorsements(config: VerifierConfig) -> EndorsementStore:
    """The endorsement store from ``endorsement.roots`` (and the swtpm local CA or the
    simulation root where set).
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
    simulation_root = config.endorsement.trust_simulation_root
    if simulation_root is not None:
        if not simulation_root.is_file():
            raise ConfigError(
                f"simulation EK root {simulation_root} does not exist: fix or remove "
                "`endorsement.trust_simulation_root:` in the configuration"
            )
        _check_local_ca(
            simulation_root,
            what="simulation EK root",
            setting="trust_simulation_root",
            remedy="the simulation root's certificate (simulation-ek-root.pem)",
        )
        logger.warning(
            "trusting simulation EK root %s as an endorsement root: simulated TPMs will "
            "enroll (simulation setting, never for production)",
            simulation_root,
        )
        paths.append(simulation_root)
    store = EndorsementStore.from_paths(paths)
    logger.info("endorsement roots: %d from %s", len(store.roots), ", ".join(str(p) for p in paths))
    return store


def _check_local_ca(
    path: Path,
    *,
    what: str = "swtpm local CA",
    setting: str = "trust_swtpm_local_ca",
    remedy: str = "the swtpm local CA's certificate (issuercert.pem)",
) -> None:
    """The swtpm local CA (or the simulation root) must hold a certificate: one that holds
    none would be logged as trusted and trust nothing."""
    try:
        data = path.read_bytes()
        certs = load_certificates(data, source=str(path)) if data.strip() else []
    except OSError as exc:
        raise ConfigError(
            f"{what} {path}: {exc.strerror}: `endorsement.{setting}:` must name a readable file"
        ) from exc
    except MalformedInput:
        certs = []
    if not certs:
        raise ConfigError(
            f"{what} {path} holds no certificate (PEM or DER): give {remedy}, or remove "
            f"`endorsement.{setting}:` from the configuration"
        )


@dataclass(frozen=True)
class WorkerPlace:
    """This process's place among the verifier's workers (verifier/workers.py): worker
    ``index`` of ``count``, all serving the same ports (SO_REUSEPORT), which the parent
    chose and checked, and the same database, which it migrated."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"worker{self.index}"


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


def _settings(config: VerifierConfig, worker: WorkerPlace | None) -> Settings:
    settings = Settings.from_config(config)
    if worker is not None and worker.index > 0:
        # One CRL file, written by one worker; each serves its own CRL over GetCrl.
        settings = replace(settings, revocation=replace(settings.revocation, crl_path=None))
    return settings


# gRPC health: the service name each worker answers SERVING for, after this prefix.
WORKER_HEALTH = "devtrust.verifier."
# The device the database probe asks for: a read that reaches the database, of no device.
_PROBE_DEVICE = DeviceId("0" * 64)


def _store_probe(repos: Repositories) -> Callable[[], Awaitable[object]]:
    async def probe() -> object:
        return await repos.devices.get(_PROBE_DEVICE)

    return probe


async def _serving(
    servicer: health.aio.HealthServicer, names: list[str], store_health: StoreHealth
) -> None:
    """SERVING for ``names``, for as long as the database answers."""
    for name in names:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    store_health.serve(servicer, names)


async def _load_state(
    running: RunningVerifier, enrollment: EnrollmentService, *, shared: bool
) -> None:
    """What the servers need before serving. The change feed's position is taken before
    the state it keeps current is loaded (nothing falls between), and its consumers
    subscribed: the revoker always (other processes may share the database), the trust watch
    when ``shared`` (several workers, or replicas on a database server: a decision made by
    any of them reaches every watch), the policy (verifier/policy_store.py); it polls once
    they are loaded."""
    feed = running.feed
    if feed is not None:
        await feed.open()
        running.revoker.follow(feed)
        if shared:
            running.watch.follow(feed)
        if running.shared_policy is not None:
            feed.subscribe(running.shared_policy.follow)
    if running.shared_policy is not None:
        await running.shared_policy.start()  # the fleet's policy (the database's), before serving
    await running.revoker.start()  # the live revocations and the first CRL, before serving
    metrics = running.attestation.metrics_service
    if metrics is not None:
        metrics.start()  # its endpoint (ConfigError when it cannot listen), the fleet read
    await enrollment.start()  # the inventory, before any device enrolls
    if feed is not None:
        feed.run()


def _reference_values(config: VerifierConfig) -> ReferenceValues | None:
    refs = ReferenceValues.load(config.reference_values) if config.reference_values else None
    if refs is not None:
        logger.info(
            "reference values: %d groups from %s", len(refs.groups), config.reference_values
        )
    return refs


def _local_policy(config: VerifierConfig) -> PolicyHolder:
    """The policy of this replica's files (ConfigError when it does not load)."""
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
    return policy


_started = itertools.count()


def _origin(worker: WorkerPlace | None) -> str:
    """This verifier's name on what it writes to the shared database: host, worker, pid, and
    after the first a number, so that two verifiers in one process (tests of replicas) do
    not take each other's changes for their own."""
    name = f"{socket.gethostname()}/{worker.name if worker else 'verifier'}/{os.getpid()}"
    n = next(_started)
    return f"{name}/{n}" if n else name


def _change_feed(repos: Repositories, worker: WorkerPlace | None) -> ChangeFeed | None:
    """The reader of what other processes (workers, replicas) change in the database."""
    return repos.change_feed(_origin(worker))


async def start_verifier(
    config: VerifierConfig, *, clock: Clock = utcnow, worker: WorkerPlace | None = None
) -> RunningVerifier:
    """The verifier serving; with ``worker``, as one of several processes (their ports
    shared, the CRL file written by worker 0 only, the trust watch fed by the database)."""
    settings = _settings(config, worker)
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
    refs = _reference_values(config)
    policy = _local_policy(config)
    gpu = GpuAnchorsHolder(config.gpu)  # ConfigError: a root file missing or not PEM
    repos = await open_repositories(config.database)
    feed = _change_feed(repos, worker)
    # Prometheus metrics (metrics.listen; none when ""): verifier/metrics.py.
    metrics_service = open_metrics(
        config.metrics,
        repos.devices,
        clock=clock,
        minimum=settings.certificates.min_tier_for,
        worker=(worker.index, worker.count) if worker is not None else None,
    )
    metrics = metrics_service.metrics if metrics_service is not None else None
    # The fleet's policy is the database's (verifier/policy_store.py): this one published,
    # or replaced by it, at _load_state.
    shared_policy = SharedPolicy(
        policy,
        repos.policies(),
        origin=_origin(worker) if feed is None else feed.origin,
        clock=clock,
    )
    # Who may call what: one table, one interceptor for both ports (verifier/authz.py); it
    # runs inside ErrorMapping, which maps its refusals to status codes.
    authorizer = Authorizer(
        trust_domain=settings.trust_domain,
        configured=config.roles,
        roles=repos.roles,
        devices=repos.devices,
    )
    # The database's state, shown by health; told of each call that met an outage.
    store_health = StoreHealth(_store_probe(repos), interval_s=config.server.store_probe_s)
    errors = ErrorMapping(call_timeout_s=config.server.call_timeout_s, outage=store_health.failed)
    interceptors = [errors, Authorization(authorizer)]
    inventory = (
        Inventory.load(settings.enrollment.inventory)
        if settings.enrollment.inventory is not None
        else None
    )

    reuse_port = worker is not None
    enroll = grpc.aio.server(
        interceptors=interceptors, options=server_options(config, reuse_port=reuse_port)
    )
    enrollment = EnrollmentService(
        repos=repos,
        endorsements=endorsements,
        ca=ca,
        settings=settings.enrollment,
        certificates=settings.certificates,
        limits=settings.limits,
        clock=clock,
        inventory=inventory,
        metrics=metrics,
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

    attest = grpc.aio.server(
        interceptors=interceptors, options=server_options(config, reuse_port=reuse_port)
    )
    attestor = Attestor(
        issuers=issuers,
        attestation=settings.attestation,
        certificates=settings.certificates,
        limits=settings.limits,
        refs=refs,
        policy=policy,
        gpu=gpu,
    )
    watch = TrustWatch()
    revoker = Revoker(
        revocations=repos.revocations,
        # The CA that signs device certificates signs their CRL.
        signer=issuers,
        settings=settings.revocation,
        clock=clock,
        metrics=metrics,
    )
    attestation = AttestationService(
        repos=repos,
        attestor=attestor,
        # The store first: a Result reaches the agent only once its decision is committed.
        # Revocation after the store: a device whose tier fell loses its live certificates
        # before its Result (which names them) is sent.
        # The trust watch after both: what it sends is stored.
        sinks=Sinks(
            [
                StoreSink(repos),
                # After the store (what it counts is stored), before revocation (which may
                # withhold a certificate stored already: issued, and counted revoked too).
                *([MetricsSink(metrics)] if metrics is not None else []),
                RevocationSink(revoker, settings.certificates),
                watch,
                LogSink(),
            ]
        ),
        settings=settings.attestation,
        limits=settings.limits,
        clock=clock,
        # Each stream claims its device's lease in the store shared by every worker.
        leases=repos.streams(),
        owner=f"{socket.gethostname()}/{worker.name if worker else 'verifier'}/{os.getpid()}",
        # Closed with it, after its decisions in flight, before the store.
        metrics=metrics_service,
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
            reload=shared_policy.reload,
            ear_keys=config.ear,
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
        enroll,
        attest,
        0,
        0,
        repos,
        policy,
        attestation,
        revoker,
        watch,
        services,
        feed=feed,
        health=[health_servicer, enroll_health],
        store_health=store_health,
        drain_s=config.server.drain_s,
        shared_policy=shared_policy,
        calls=errors.calls,
        gpu=gpu,
    )
    try:
        # Several processes: workers, or replicas on a database server (not an SQLite file).
        shared = (worker is not None and worker.count > 1) or not isinstance(config.database, Path)
        await _load_state(running, enrollment, shared=shared)
        probe = worker is None  # the workers' parent probed the ports (verifier/workers.py)
        running.enrollment_port = listen(
            enroll, config.listen.enrollment, tls, "listen.enrollment", probe=probe
        )
        running.attestation_port = listen(
            attest, config.listen.attestation, mtls, "listen.attestation", probe=probe
        )
        for server in (enroll, attest):
            await _start(server, running)
        # Each worker answers for itself too: a client learns which one its connection
        # reached (tests, and an operator chasing one worker's logs).
        mine = [f"{WORKER_HEALTH}{worker.name}"] if worker is not None else []
        await _serving(health_servicer, ["", *names[:2], *mine], store_health)
        await _serving(enroll_health, ["", enroll_names[0], *mine], store_health)
        store_health.start()
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


__all__ = [
    "WORKER_HEALTH",
    "RunningVerifier",
    "WorkerPlace",
    "bind_problem",
    "load_endorsements",
    "start_verifier",
    "utcnow",
]
