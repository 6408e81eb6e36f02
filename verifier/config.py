"""Verifier configuration (YAML -> frozen dataclasses). See packaging/config/verifier.yaml."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from agent.configfile import from_mapping, load_yaml
from agent.errors import ConfigError
from verifier.tpm.constants import hash_alg
from verifier.tpm.structures import PcrSelect
from verifier.trust import Tier

DEFAULT_ROOTS = Path(__file__).resolve().parent / "data" / "ek-roots"
DEFAULT_POLICY = Path(__file__).resolve().parent / "data" / "policy" / "default.yaml"


@dataclass(frozen=True)
class ListenConfig:
    # TLS (server-authenticated only): enrollment, for devices without a certificate yet.
    enrollment: str = "127.0.0.1:7443"
    # mTLS only: attestation streams (agent certificates) and queries (operator certificates).
    attestation: str = "127.0.0.1:7444"


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
    # TPMs without an EK certificate (some cloud vTPMs): sha256 of the EK's
    # SubjectPublicKeyInfo (hex), which is also the device id.
    allowed_ek_sha256: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AttestationConfig:
    interval_s: float = 60.0
    evidence_timeout_s: float = 30.0
    hello_timeout_s: float = 10.0
    # Evidence older than this makes the device's tier none.
    staleness_s: float = 180.0
    # PCR banks and indices quoted in every challenge.
    pcrs: dict[str, list[int]] = field(
        default_factory=lambda: {"sha256": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14]}
    )

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.evidence_timeout_s <= 0 or self.staleness_s <= 0:
            raise ValueError("interval_s, evidence_timeout_s and staleness_s must be positive")
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

    def __post_init__(self) -> None:
        tier = Tier.parse(self.min_tier)
        if tier is Tier.NONE:
            raise ValueError("min_tier none would certify devices nobody appraised")
        if self.device_lifetime_s < 60:
            raise ValueError("device_lifetime_s must be at least 60")

    @property
    def min(self) -> Tier:
        return Tier.parse(self.min_tier)


@dataclass(frozen=True)
class EnrollmentConfig:
    # Enrolled devices wait for `devtrust-verifier approve DEVICE` before they may attest.
    require_approval: bool = False
    # Every enrollment must present a one-time token from `devtrust-verifier token create`.
    require_token: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class VerifierConfig:
    trust_domain: str = "devtrust.local"
    # Reference values per device group (see verifier/refs.py); none means no golden values
    # or boot rules: the executables claim is then not asserted.
    reference_values: Path | None = None
    # Posture and GPU policy (CEL rules, see verifier/policy.py); the shipped default for GPU
    # hosts unless set. `policy: null` in the file appraises TPM evidence only.
    policy: Path | None = DEFAULT_POLICY
    database: Path = Path("/var/lib/devtrust/verifier.db")
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    ca: CaConfig = field(default_factory=CaConfig)
    endorsement: EndorsementConfig = field(default_factory=EndorsementConfig)
    attestation: AttestationConfig = field(default_factory=AttestationConfig)
    certificates: CertificatesConfig = field(default_factory=CertificatesConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @classmethod
    def load(cls, path: Path) -> VerifierConfig:
        return from_mapping(cls, load_yaml(path), where=str(path), base=path.parent)


__all__ = ["ConfigError", "VerifierConfig"]
