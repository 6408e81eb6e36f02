"""Agent configuration (YAML -> frozen dataclasses). See packaging/config/agent.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from devtrust.agent.addresses import split_address
from devtrust.core.config import from_mapping, load_yaml

# Persistent handle of the devtrust AK: the endorsement-hierarchy range of the TCG
# "Provisioning Guidance" (0x81010000-0x8101FFFF), next to the RSA EK at 0x81010001.
DEFAULT_AK_HANDLE = 0x81010002
GPU_SOURCES = ("auto", "nvml", "nvidia-smi-xml", "procfs", "none")
GPU_ATTESTATION = ("auto", "off")
# EK templates (TCG EK Credential Profile 2.0) as tpm2-pytss's create_ek_template names them,
# with its short aliases; agent/tpm.py hands the name to it. Not EK-HIGH-ECCSM2P256 (H-5):
# the verifier reads no SM2 key.
EK_TYPES = {
    "EK-RSA2048": "L-1",
    "EK-ECC256": "L-2",
    "EK-HIGH-RSA2048": "H-1",
    "EK-HIGH-ECC256": "H-2",
    "EK-HIGH-ECC384": "H-3",
    "EK-HIGH-ECC521": "H-4",
    "EK-HIGH-RSA3072": "H-6",
    "EK-HIGH-RSA4096": "H-7",
}
_EK_NAMES = {key.lower(): name for name, alias in EK_TYPES.items() for key in (name, alias)}
# secrets.token_urlsafe, as `devtrust token create` makes bootstrap tokens.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class VerifierEndpoint:
    # HOST:PORT of the verifier, or a list of them (replicas sharing one database): the agent
    # uses one at a time and moves to the next when it is unreachable, refuses or drains
    # (agent/addresses.py). A DNS name with several A/AAAA records counts as several.
    enrollment: str | list[str] = "127.0.0.1:7443"
    attestation: str | list[str] = "127.0.0.1:7444"
    # CA bundle that verifies the verifier's server certificate.
    ca_bundle: Path = Path("/etc/devtrust/agent/verifier-ca.pem")
    # TLS name to expect when it differs from the host in the address.
    server_name: str = ""

    def __post_init__(self) -> None:
        for name in ("enrollment", "attestation"):
            value = getattr(self, name)
            entries = [value] if isinstance(value, str) else list(value)
            if not entries:
                raise ValueError(f"{name} is an empty list: give at least one HOST:PORT")
            for i, address in enumerate(entries):
                where = name if isinstance(value, str) else f"{name}[{i}]"
                try:
                    split_address(address)
                except ValueError as exc:
                    raise ValueError(f"{where} {exc}") from None
            object.__setattr__(self, name, value if isinstance(value, str) else entries)

    @property
    def enrollment_addresses(self) -> tuple[str, ...]:
        return _addresses(self.enrollment)

    @property
    def attestation_addresses(self) -> tuple[str, ...]:
        return _addresses(self.attestation)


def _addresses(value: str | list[str]) -> tuple[str, ...]:
    return (value.strip(),) if isinstance(value, str) else tuple(a.strip() for a in value)


def metrics_address(address: str) -> tuple[str, int]:
    """(host, port) of the metrics endpoint's ``HOST:PORT`` or ``[V6]:PORT``, port 0..65535
    (0: any free port); ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r} is an IPv6 address without brackets: write [{host}]:{port}")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT with 0 <= PORT <= 65535, got {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class MetricsConfig:
    """The agent's Prometheus endpoint (agent/metrics.py): plain HTTP, no authentication."""

    # HOST:PORT of /metrics (e.g. 127.0.0.1:9472); "" (the default): off, and the metrics
    # library is not even imported (the agent stays small).
    listen: str = ""

    def __post_init__(self) -> None:
        if self.listen:
            try:
                metrics_address(self.listen)
            except ValueError as exc:
                raise ValueError(f'listen: {exc} ("" turns the endpoint off)') from None


@dataclass(frozen=True)
class TpmConfig:
    # tpm2-tss TCTI: "device:/dev/tpmrm0" on hosts, "swtpm:host=127.0.0.1,port=2321" in tests.
    tcti: str = "device:/dev/tpmrm0"
    # EK template (TCG EK Credential Profile 2.0, tpm2-pytss names): one of EK_TYPES, or its
    # alias (L-1, H-3, ...); any case. Stored as the canonical name.
    ek_type: str = "EK-RSA2048"
    ak_handle: int = DEFAULT_AK_HANDLE

    def __post_init__(self) -> None:
        canonical = _EK_NAMES.get(self.ek_type.strip().lower())
        if canonical is None:
            raise ValueError(
                f"ek_type {self.ek_type!r} is not an EK template this agent knows: "
                f"give one of {', '.join(EK_TYPES)} (the one your TPM's EK certificate is for; "
                "EK-RSA2048 on most TPMs)"
            )
        object.__setattr__(self, "ek_type", canonical)
        if not 0x81010000 <= self.ak_handle <= 0x8101FFFF:
            raise ValueError(
                f"ak_handle 0x{self.ak_handle:08x} is outside the endorsement "
                "persistent range 0x81010000-0x8101ffff"
            )


@dataclass(frozen=True)
class WorkloadApiConfig:
    """The SPIFFE Workload API the agent serves to local workloads (agent/workload.py)."""

    enabled: bool = True
    # The unix socket workloads connect to (SPIFFE_ENDPOINT_SOCKET=unix:PATH); unset:
    # workload_api.socket in runtime_dir.
    socket: Path | None = None
    # Who may connect, by the peer's Unix credentials (SO_PEERCRED): its uid among users, or
    # its primary or a supplementary group among groups. Names or numbers. The agent's own
    # user may always connect (it can read the key files anyway); nobody else by default.
    users: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    # The group that may read device.key (mode 0640) besides the agent's user; empty: none
    # (0600). The runtime directory is searchable (0711) so that it can reach the file.
    key_group: str = ""

    def __post_init__(self) -> None:
        for name in ("users", "groups"):
            for entry in getattr(self, name):
                if not entry.strip():
                    raise ValueError(f"{name} holds an empty entry: give a name or a number")


@dataclass(frozen=True)
class AgentConfig:
    verifier: VerifierEndpoint = field(default_factory=VerifierEndpoint)
    tpm: TpmConfig = field(default_factory=TpmConfig)
    # Enrollment state (device id, channel key and certificate): persistent.
    state_dir: Path = Path("/var/lib/devtrust-agent")
    # Device key and certificate: tmpfs, never on disk (DESIGN.md "Certificates").
    runtime_dir: Path = Path("/run/devtrust")
    # The TCG event log of this host's TPM; none on hosts (and swtpm tests) without one.
    event_log: Path | None = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
    # Where OS posture is read from (tests point it at a prepared tree).
    posture_root: Path = Path("/")
    # Mounts whose disk encryption is reported.
    encrypted_mounts: list[str] = field(default_factory=lambda: ["/"])
    # GPU state source: auto (NVML, else /proc/driver/nvidia), nvml, nvidia-smi-xml, procfs,
    # none. gpu_xml is the nvidia-smi -q -x file for nvidia-smi-xml.
    gpu_source: str = "auto"
    gpu_xml: Path | None = None
    # Each GPU's own attestation (agent/gpu/attest.py), asked at every challenge: auto (the
    # Hopper and later GPUs NVML reports Confidential Computing capable; the others are
    # reported unable to, with the reason) or off (every GPU reported "unsupported",
    # "disabled in agent.yaml"). YAML reads an unquoted off as false: both mean off (and
    # true auto); stored as "auto" or "off".
    gpu_attestation: str | bool = "auto"
    # How often the posture signals read from /proc and /sys are polled for PostureChanged
    # (the others are watched with inotify, agent/watch.py). Each poll wakes the agent: 0.5 s
    # keeps it under 0.1% of a core and a change still reaches the verifier within a second.
    watch_interval_s: float = 0.5
    # The first posture change is sent at once; further ones within this many seconds are
    # coalesced into one PostureChanged sent when the window closes (agent/posture.py).
    posture_debounce_s: float = 5.0
    # A one-time token from the verifier's operator (`devtrust token create`); it
    # may carry the zone and labels the operator assigns to this host. A host never chooses
    # its own zone: there is no zone setting here.
    bootstrap_token: str = ""
    # Deadline of each call to the verifier.
    rpc_timeout_s: float = 30.0
    # Enrollment and the attestation stream retry an unreachable verifier (the next address,
    # when there are several) after a wait drawn from 0 to reconnect_min_s x 2**failures,
    # capped at reconnect_max_s (full jitter, agent/backoff.py); the count starts again after
    # a stream that delivered a result. The TPM, when it stops answering, is retried alike.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Ask for a new device certificate once this fraction of its lifetime has passed.
    renew_at: float = 0.5
    workload_api: WorkloadApiConfig = field(default_factory=WorkloadApiConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        for name in ("rpc_timeout_s", "reconnect_min_s", "reconnect_max_s", "watch_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.renew_at < 1:
            raise ValueError("renew_at must be between 0 and 1")
        if not self.posture_debounce_s > 0:
            raise ValueError("posture_debounce_s must be positive")
        if self.gpu_source not in GPU_SOURCES:
            raise ValueError(
                f"gpu_source {self.gpu_source!r}: auto, nvml, nvidia-smi-xml, procfs or none"
            )
        if self.gpu_source == "nvidia-smi-xml" and self.gpu_xml is None:
            raise ValueError(
                "gpu_source nvidia-smi-xml needs gpu_xml: set gpu_xml to the file "
                "`nvidia-smi -q -x` wrote, or set gpu_source to auto"
            )
        if self.gpu_xml is not None and self.gpu_source != "nvidia-smi-xml":
            raise ValueError(
                f"gpu_xml {self.gpu_xml} is set but gpu_source is {self.gpu_source!r}, which "
                "does not read it: set gpu_source to nvidia-smi-xml, or remove gpu_xml"
            )
        self._check_gpu_attestation()
        self._check_token()

    def _check_gpu_attestation(self) -> None:
        value = self.gpu_attestation
        if isinstance(value, bool):
            value = "auto" if value else "off"
        if value not in GPU_ATTESTATION:
            raise ValueError(
                f"gpu_attestation {self.gpu_attestation!r}: auto (each GPU that can attests) "
                "or off (none is asked)"
            )
        object.__setattr__(self, "gpu_attestation", value)

    def _check_token(self) -> None:
        """A token pasted with the line's end or a space around it is the same token."""
        token = self.bootstrap_token.strip()
        object.__setattr__(self, "bootstrap_token", token)
        bad = _TOKEN.sub("", token)
        if bad:  # never echo the token: it is a secret
            raise ValueError(
                f"bootstrap_token holds {bad[0]!r} at position {token.index(bad[0]) + 1}, which "
                "no token has (A-Z a-z 0-9 - _): paste exactly the line "
                "`devtrust token create` printed"
            )

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        return from_mapping(cls, load_yaml(path), where=str(path), base=path.parent)
