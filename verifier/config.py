"""Verifier configuration (YAML -> frozen dataclasses). See packaging/config/verifier.yaml."""

from __future__ import annotations

import dataclasses
import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

from devtrust.core.config import from_mapping, load_yaml
from devtrust.core.errors import ConfigError
from devtrust.core.tier import Tier
from devtrust.verifier.roles import Role, operator_name_problem
from devtrust.verifier.tpm.constants import hash_alg
from devtrust.verifier.tpm.structures import PcrSelect

DEFAULT_ROOTS = Path(__file__).resolve().parent / "data" / "ek-roots"
DEFAULT_POLICY = Path(__file__).resolve().parent / "data" / "policy" / "default.yaml"
GPU_ROOTS = Path(__file__).resolve().parent / "data" / "gpu-roots"
DEFAULT_GPU_DEVICE_ROOT = GPU_ROOTS / "nvidia-device-identity-ca.pem"
DEFAULT_RIM_ROOT = GPU_ROOTS / "nvidia-corim-signing-root-ca.pem"
# SPIFFE trust domain names: lowercase letters, digits, dots, hyphens, underscores.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# gRPC takes message sizes as a C int; below 64 KiB no real evidence fits.
MESSAGE_BYTES = (64 * 1024, 2**31 - 1)
# `database:`: a URL is SCHEME://...; anything else is a file path (SQLite).
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@|(password=)[^&]*", re.IGNORECASE)
SERVER_SCHEMES = ("postgresql", "postgres")
DATABASE_FORMS = (
    "a file path or sqlite:///PATH (SQLite), or postgresql://USER:PASSWORD@HOST:PORT/NAME "
    "(PostgreSQL)"
)


def clip(value: object, limit: int = 64) -> str:
    """A user's value as it is echoed in a message: repr, at most ``limit`` characters."""
    text = str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def trust_domain_problem(name: str) -> str | None:
    """Why ``name`` is not a SPIFFE trust domain name, or None."""
    if _TRUST_DOMAIN.fullmatch(name):
        return None
    return (
        f"{clip(name)} is not a SPIFFE trust domain: lowercase letters, digits, dots, hyphens "
        "and underscores, no scheme (e.g. devtrust.local)"
    )


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port), with 0 <= port <= 65535 (0: any free
    port). ValueError otherwise: gRPC would take a port of 99999 as 34463, and no port as 443."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r} is an IPv6 address without brackets: write [{host}]:{port}")
    digits = port.isascii() and port.isdigit()
    if not sep or not host or not digits or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with 0 <= PORT <= 65535, got {address!r}")
    return host, int(port)


def redact(url: str) -> str:
    """``url`` without its password (in the user part or a password= parameter)."""
    return _PASSWORD.sub(lambda m: (m[1] + "***@") if m[1] else m[2] + "***", url)


class DatabaseUrl(str):
    """A database server's URL, as configured. It prints (str, repr, format, logs) without
    its password; the driver gets the text itself."""

    @property
    def scheme(self) -> str:
        return self.split("://", 1)[0].lower()

    @property
    def redacted(self) -> str:
        return redact(str.__str__(self))

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return repr(self.redacted)

    def __format__(self, spec: str) -> str:
        return format(self.redacted, spec)


def database_location(text: str, *, base: Path | None = None) -> Path | DatabaseUrl:
    """What a configured database names: the SQLite file of a path or of sqlite:///PATH
    (PATH written as a path would be: relative to ``base``, sqlite:////var/... absolute, as
    SQLAlchemy reads it), or a server's URL. Which backend opens what: storage.backends.
    ValueError naming the accepted forms for anything else."""
    match = _URL.fullmatch(text)
    if match is None:
        if not text:
            raise ValueError(f"'': expected {DATABASE_FORMS}")
        return _file(text, base)
    scheme, rest = match[1].lower(), match[2]
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                f"{clip(text)}: write sqlite:///PATH (three slashes: SQLite has no host; "
                "sqlite:////var/lib/devtrust/verifier.db for an absolute path)"
            )
        return _file(rest[1:], base)
    if scheme in SERVER_SCHEMES:
        return DatabaseUrl(text)
    raise ValueError(
        f"{clip(redact(text))}: {scheme}:// is not a database devtrust can use: give "
        f"{DATABASE_FORMS}"
    )


def _file(text: str, base: Path | None) -> Path:
    path = Path(text).expanduser()
    return base / path if base is not None and not path.is_absolute() else path


@dataclass(frozen=True)
class ListenConfig:
    # TLS (server-authenticated only): enrollment, for devices without a certificate yet.
    enrollment: str = "127.0.0.1:7443"
    # mTLS only: attestation streams (agent certificates) and queries (operator certificates).
    attestation: str = "127.0.0.1:7444"

    def __post_init__(self) -> None:
        for name in ("enrollment", "attestation"):
            try:
                parse_address(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        if self.enrollment == self.attestation and parse_address(self.enrollment)[1] != 0:
            raise ValueError(
                f"enrollment and attestation are both {self.enrollment}: give each its own port"
            )


@dataclass(frozen=True)
class TlsConfig:
    server_cert: Path = Path("/etc/devtrust/verifier/server.pem")
    server_key: Path = Path("/etc/devtrust/verifier/server.key")


@dataclass(frozen=True)
class CaConfig:
    cert: Path = Path("/etc/devtrust/verifier/ca.pem")
    key: Path = Path("/etc/devtrust/verifier/ca.key")


@dataclass(frozen=True)
class EndorsementConfig:
    # Files or directories of trusted EK manufacturer roots (PEM or DER).
    roots: list[Path] = field(default_factory=lambda: [DEFAULT_ROOTS])
    # A swtpm local CA certificate to trust as well. For tests and demos only; logged at start.
    trust_swtpm_local_ca: Path | None = None
    # The EK root of simulated TPMs (devtrust.swtpm.simroot), to trust as well. For
    # simulations only; logged at start as a warning.
    trust_simulation_root: Path | None = None
    # TPMs without an EK certificate (some cloud vTPMs): sha256 of the EK's
    # SubjectPublicKeyInfo (hex), which is also the device id.
    allowed_ek_sha256: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for n, value in enumerate(self.allowed_ek_sha256):
            if not _SHA256_HEX.fullmatch(value):
                raise ValueError(
                    f"allowed_ek_sha256[{n}]: {clip(value)} is not a sha256 (64 hex digits): "
                    "give the device id the verifier logs for that TPM"
                )


@dataclass(frozen=True)
class AttestationConfig:
    # 0: the next challenge travels with each result (load tests and simulation).
    interval_s: float = 60.0
    evidence_timeout_s: float = 30.0
    hello_timeout_s: float = 10.0
    # Evidence older than this makes the device's tier none.
    staleness_s: float = 180.0
    # PostureChanged notes: the first is answered with a challenge at once; further ones
    # are coalesced into at most one challenge per this many seconds.
    posture_min_interval_s: float = 10.0
    # More PostureChanged notes than this within a minute end the stream
    # (RESOURCE_EXHAUSTED); the agent reconnects with backoff.
    posture_notes_per_minute: int = 120
    # A device's new stream gets its first challenge no sooner than this after the device's
    # last challenge on any stream: reconnecting again and again does not buy appraisals.
    stream_challenge_gap_s: float = 5.0
    # Policies are evaluated in this many worker processes, each evaluation within
    # policy_budget_s: past it the device gets policy.budget_exceeded (contraindicated) and the
    # workers are replaced (the CEL runtime holds the interpreter lock, and some of its macros
    # are quadratic in the lists a device sends).
    policy_workers: int = 2
    policy_budget_s: float = 2.0
    # Threads that appraise evidence off the event loop: one device's costly evidence
    # never holds up other devices' streams, queries or enrollments.
    appraisal_workers: int = 4
    # PCR banks and indices quoted in every challenge.
    pcrs: dict[str, list[int]] = field(
        default_factory=lambda: {"sha256": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14]}
    )

    def __post_init__(self) -> None:
        if self.interval_s < 0 or self.evidence_timeout_s <= 0 or self.staleness_s <= 0:
            raise ValueError(
                "evidence_timeout_s and staleness_s must be positive, interval_s must not be "
                "negative (0: the next challenge with each result, for load tests)"
            )
        if self.posture_min_interval_s < 0 or self.stream_challenge_gap_s < 0:
            raise ValueError(
                "posture_min_interval_s and stream_challenge_gap_s must not be negative"
            )
        if self.policy_workers <= 0 or self.policy_budget_s <= 0:
            raise ValueError("policy_workers and policy_budget_s must be positive")
        if self.posture_notes_per_minute <= 0 or self.appraisal_workers <= 0:
            raise ValueError("posture_notes_per_minute and appraisal_workers must be positive")
        for bank, pcrs in self.pcrs.items():
            hash_alg(bank)
            if any(not 0 <= p <= 23 for p in pcrs):
                raise ValueError(f"pcrs.{bank}: PCR indices are 0..23")

    @property
    def selection(self) -> tuple[PcrSelect, ...]:
        return tuple(
            PcrSelect(hash_alg(b), tuple(sorted(set(p)))) for b, p in self.pcrs.items() if p
        )

    @property
    def staleness(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.staleness_s)


@dataclass(frozen=True)
class CertificatesConfig:
    device_lifetime_s: int = 900
    channel_lifetime_s: int = 30 * 24 * 3600
    # Lowest tier that still gets a device certificate (the tier is written into it).
    min_tier: str = "affirming"
    # Per zone, the lowest tier instead of min_tier: {zone: tier}. A device whose tier falls
    # below its zone's minimum gets no certificate and its live ones are revoked.
    zone_min_tier: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tier = Tier.parse(self.min_tier)
        if tier is Tier.NONE:
            raise ValueError("min_tier none would certify devices nobody appraised")
        for zone, text in self.zone_min_tier.items():
            try:
                zone_tier = Tier.parse(text)
            except ValueError as exc:
                raise ValueError(f"zone_min_tier.{zone}: {exc}") from None
            if zone_tier is Tier.NONE:
                raise ValueError(
                    f"zone_min_tier.{zone}: none would certify devices nobody appraised: give "
                    "affirming, warning or contraindicated"
                )
        if self.device_lifetime_s < 60:
            raise ValueError("device_lifetime_s must be at least 60")

    @property
    def min(self) -> Tier:
        return Tier.parse(self.min_tier)

    @property
    def zone_min(self) -> dict[str, Tier]:
        return {zone: Tier.parse(text) for zone, text in self.zone_min_tier.items()}


@dataclass(frozen=True)
class RevocationConfig:
    # The CRL is signed again this often even when nothing changed; its nextUpdate is two
    # intervals ahead, so a relying party that misses one refresh still holds a valid CRL.
    crl_interval_s: float = 300.0
    # Where the CRL (PEM) is also written, atomically, for relying parties that read a file.
    crl_path: Path | None = None
    # Events queued for one WatchRevocations subscriber; one that falls further behind is
    # dropped (RESOURCE_EXHAUSTED) and reconnects for a fresh snapshot.
    max_queued_events: int = 1024

    def __post_init__(self) -> None:
        if not self.crl_interval_s > 0:
            raise ValueError(f"crl_interval_s must be positive, got {self.crl_interval_s}")
        if self.max_queued_events < 1:
            raise ValueError("max_queued_events must be at least 1")


@dataclass(frozen=True)
class EnrollmentConfig:
    # Enrolled devices wait for `devtrust approve DEVICE` before they may attest.
    require_approval: bool = False
    # Every enrollment must present a one-time token from `devtrust token create`.
    require_token: bool = False
    # Operator-assigned zones and labels: a YAML mapping device id -> {zone, labels}, loaded
    # and validated whole at start; it wins over every other assignment (verifier/inventory.py).
    inventory: Path | None = None
    # Enroll calls per peer IP address (any port): a token bucket of `burst` calls, refilled
    # at rate_per_minute. Past it: RESOURCE_EXHAUSTED "retry in N s".
    rate_per_minute: float = 60.0
    burst: int = 20
    # Challenged enrollments awaiting their Activate: per device the oldest beyond
    # max_pending_per_device is dropped; past max_pending in all, Enroll is RESOURCE_EXHAUSTED.
    max_pending_per_device: int = 4
    max_pending: int = 10_000

    def __post_init__(self) -> None:
        if self.rate_per_minute <= 0 or self.burst < 1:
            raise ValueError("rate_per_minute must be positive and burst at least 1")
        if self.max_pending_per_device < 1 or self.max_pending < 1:
            raise ValueError("max_pending_per_device and max_pending must be at least 1")


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what one device may send (issue 7: no device can freeze the verifier).

    Defaults sit far above real hosts (8 GPUs of 18 NVLinks, a few hundred modules, event
    logs under 100 KiB in the corpus); past a limit the evidence is refused as
    INVALID_ARGUMENT naming the limit, and nothing is stored."""

    max_message_bytes: int = 4 * 1024 * 1024
    # Repeated fields of one evidence body.
    max_gpus: int = 64
    max_nvlinks_per_gpu: int = 64
    max_mig_devices_per_gpu: int = 64
    max_xids_per_gpu: int = 1024
    max_modules: int = 8192
    max_listening_sockets: int = 8192
    max_mounts: int = 4096
    max_unavailable: int = 1024
    # Entries of any map (labels, cc_settings, fabric_health).
    max_map_entries: int = 256
    # Signals named in one PostureChanged.
    max_posture_signals: int = 64
    # One device's event log since its last reboot, all parts together.
    max_event_log_bytes: int = 4 * 1024 * 1024
    max_event_log_events: int = 20_000

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        low, high = MESSAGE_BYTES
        if not low <= self.max_message_bytes <= high:
            raise ValueError(
                f"max_message_bytes {self.max_message_bytes} is out of range: give {low} "
                f"(64 KiB) to {high} bytes"
            )


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (verifier/metrics.py). Plain HTTP, no authentication: keep it
    on loopback or a management network (the shipped configuration: 127.0.0.1:9471)."""

    # HOST:PORT of /metrics; "" (the default): no endpoint and no metrics kept.
    listen: str = ""
    # The devices-by-tier-and-zone gauges are read from the database this often (seconds),
    # so that every replica shows the fleet as stored, not its own streams' view.
    refresh_s: float = 10.0

    def __post_init__(self) -> None:
        if self.listen:
            try:
                parse_address(self.listen)
            except ValueError as exc:
                raise ValueError(f'listen: {exc} ("" turns the endpoint off)') from None
        if not 0.1 <= self.refresh_s <= 3600.0:  # also false for NaN
            raise ValueError(f"refresh_s: give 0.1 to 3600 seconds, got {self.refresh_s}")


# Worker processes of one verifier: at most this many (each a full gRPC server, sharing the
# ports and the database; verifier/workers.py).
MAX_WORKERS = 64


# Bounds of the server's timing keys (seconds): (key, lowest, highest).
_SERVER_SECONDS = (
    ("drain_s", 0.5, 600.0),
    ("call_timeout_s", 1.0, 3600.0),
    ("keepalive_s", 1.0, 7200.0),
    ("keepalive_timeout_s", 1.0, 600.0),
    ("store_probe_s", 0.1, 600.0),
)


@dataclass(frozen=True)
class GpuConfig:
    """GPU attestation (verifier/gpu/): NVIDIA GPUs' own signed measurement reports."""

    # Roots of GPU identity certificates (PEM files or directories): NVIDIA's Device
    # Identity CA, shipped with devtrust. A simulation's test root is listed here only by
    # the simulator's own configuration.
    device_roots: list[Path] = field(default_factory=lambda: [DEFAULT_GPU_DEVICE_ROOT])
    # Roots the signatures of reference integrity manifests (RIMs) must chain to: NVIDIA's
    # CoRIM signing Root CA, shipped with devtrust.
    rim_roots: list[Path] = field(default_factory=lambda: [DEFAULT_RIM_ROOT])
    # The RIM store: driver and VBIOS RIMs verified when added (`devtrust gpu rim add`),
    # read at start and on reload; never fetched while appraising.
    rim_store: Path = Path("/var/lib/devtrust/rims")
    # Where `devtrust gpu rim fetch` asks for RIMs by ID: NVIDIA's RIM service, or a mirror
    # that answers the same way (https://; http:// only for a mirror on a trusted network).
    rim_service: str = "https://rim.attestation.nvidia.com/v1/rim/"
    # CRLs and OCSP responses for the GPUs' identity certificates, as the operator fetched
    # them (files in this directory, PEM or DER); none: revocation is unknown (a finding).
    # A file that is neither is logged and left out; the others count. (RIM signers are
    # checked when a RIM is added, not against revocation data.)
    revocation: Path | None = None
    # A CRL or OCSP response older than this (from its thisUpdate / producedAt) is stale:
    # a warning finding that names its age.
    revocation_max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if not self.revocation_max_age_s > 0:
            raise ValueError("revocation_max_age_s must be positive (seconds)")
        if not self.rim_service.startswith(("https://", "http://")):
            raise ValueError(
                f"rim_service: expected an https:// URL (NVIDIA's RIM service or a mirror), "
                f"got {clip(self.rim_service)}"
            )


@dataclass(frozen=True)
class EarConfig:
    """Attestation results as EAR (draft-ietf-rats-ear), verifier/ear.py."""

    # The key that signs EARs as JWTs (ES256, P-256 PEM), written by `devtrust-verifier
    # init`; relying parties verify with its certificate (signing_cert).
    signing_key: Path = Path("/etc/devtrust/verifier/ear.key")
    signing_cert: Path = Path("/etc/devtrust/verifier/ear.pem")


@dataclass(frozen=True)
class ServerConfig:
    # Worker processes serving the same ports (SO_REUSEPORT) and database; 1: one process,
    # as before. `devtrust-verifier serve --workers N` overrides it.
    workers: int = 1
    # SIGTERM drains the verifier within this bound: health NOT_SERVING, each attestation
    # stream ended after its decision in flight (agents reconnect elsewhere), unary calls
    # finished; then the process exits.
    drain_s: float = 10.0
    # Every unary call (queries, enrollment) ends within this: past it DEADLINE_EXCEEDED,
    # whatever deadline the client set (none, or a long one).
    call_timeout_s: float = 30.0
    # HTTP/2 keepalive: a ping after this long without traffic on a connection, and the
    # connection dropped when the peer does not answer within keepalive_timeout_s, so that
    # a peer gone silent (a dead host, a dropped route) does not hold a stream forever.
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # The database is asked this often whether it answers; while it does not, gRPC health
    # says NOT_SERVING (load balancers and agents move to another replica).
    store_probe_s: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers: give 1 to {MAX_WORKERS} processes, got {self.workers}")
        for name, low, high in _SERVER_SECONDS:
            value = getattr(self, name)
            if not low <= value <= high:  # also false for NaN
                raise ValueError(f"{name}: give {low:g} to {high:g} seconds, got {value}")


@dataclass(frozen=True)
class VerifierConfig:
    trust_domain: str = "devtrust.local"
    # Reference values per device group (see verifier/refs.py); none means no golden values
    # or boot rules: the executables claim is then not asserted.
    reference_values: Path | None = None
    # Posture and GPU policy (CEL rules, see verifier/policy.py); the shipped default for GPU
    # hosts unless set. `policy: null` in the file appraises TPM evidence only.
    policy: Path | None = DEFAULT_POLICY
    # An SQLite file (a path, or sqlite:///PATH), or PostgreSQL's URL, which replicas share:
    # postgresql://USER:PASSWORD@HOST:PORT/NAME (also postgres://), libpq's parameters
    # (?sslmode=verify-full&...) plus ?pool_size=N, the connections each verifier process
    # holds at most (default 10; storage/postgresql.py). See database_location.
    database: Path | DatabaseUrl = Path("/var/lib/devtrust/verifier.db")
    listen: ListenConfig = field(default_factory=ListenConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    ca: CaConfig = field(default_factory=CaConfig)
    endorsement: EndorsementConfig = field(default_factory=EndorsementConfig)
    attestation: AttestationConfig = field(default_factory=AttestationConfig)
    certificates: CertificatesConfig = field(default_factory=CertificatesConfig)
    revocation: RevocationConfig = field(default_factory=RevocationConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    ear: EarConfig = field(default_factory=EarConfig)
    # Roles of operator names on the query API (verifier/roles.py): {alice: admin, ...}. A
    # name listed here has this role whatever the database says (`devtrust-verifier operator
    # --role` records roles for the names not listed); changed at restart.
    operators: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = trust_domain_problem(self.trust_domain)
        if problem is not None:
            raise ValueError(f"trust_domain: {problem}")
        self._check_metrics_port()
        for name, role in self.operators.items():
            problem = operator_name_problem(name)
            if problem is not None:
                raise ValueError(f"operators: {problem}")
            try:
                Role.parse(role)
            except ValueError as exc:
                raise ValueError(f"operators.{name}: {exc}") from None

    def _check_metrics_port(self) -> None:
        """The metrics endpoint needs a port of its own (0: any free port)."""
        if not self.metrics.listen:
            return
        port = parse_address(self.metrics.listen)[1]
        for name in ("enrollment", "attestation"):
            address = getattr(self.listen, name)
            if port != 0 and parse_address(address)[1] == port:
                raise ValueError(
                    f"metrics.listen {self.metrics.listen} has the port of listen.{name} "
                    f"({address}): give the metrics endpoint a port of its own"
                )

    @property
    def roles(self) -> dict[str, Role]:
        """The operators' roles the configuration assigns."""
        return {name: Role.parse(role) for name, role in self.operators.items()}

    @classmethod
    def load(cls, path: Path) -> VerifierConfig:
        data = load_yaml(path)
        database = data.get("database")
        if not (isinstance(database, str) and _URL.fullmatch(database)):
            return from_mapping(cls, data, where=str(path), base=path.parent)
        # A URL: from_mapping reads `database:` as a path, which would mangle it.
        try:
            location = database_location(database, base=path.parent)
        except ValueError as exc:
            raise ConfigError(f"{path}.database: {exc}") from None
        rest = {key: value for key, value in data.items() if key != "database"}
        config = from_mapping(cls, rest, where=str(path), base=path.parent)
        return dataclasses.replace(config, database=location)


__all__ = ["ConfigError", "DatabaseUrl", "VerifierConfig", "database_location"]
