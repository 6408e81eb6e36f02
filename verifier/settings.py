"""The verifier's settings: typed, frozen, made once at start from the configuration.

``VerifierConfig`` mirrors the YAML file (verifier/config.py validates it field by field);
``Settings`` is what the running services read: one section per service, in the units the
code uses (timedeltas, tiers, PCR selections), derived once in ``Settings.from_config``
rather than three levels deep at every call. A service takes its section, so what it
depends on is in its constructor, and a test builds just that section.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from devtrust.core.tier import Tier
from devtrust.verifier.config import LimitsConfig, VerifierConfig
from devtrust.verifier.stream import StreamTiming
from devtrust.verifier.tpm.structures import PcrSelect


@dataclass(frozen=True)
class AttestationSettings:
    """The attestation stream (verifier/attest_service.py) and its appraisals."""

    trust_domain: str
    # PCR banks and indices quoted in every challenge.
    selection: tuple[PcrSelect, ...]
    # Evidence older than this makes the device's tier none.
    staleness: datetime.timedelta
    stream: StreamTiming
    # Threads that appraise off the event loop; processes that evaluate policies, each
    # evaluation within policy_budget_s.
    appraisal_workers: int
    policy_workers: int
    policy_budget_s: float


@dataclass(frozen=True)
class CertificateSettings:
    """Certificates the verifier issues to devices (attestation) and agents (enrollment)."""

    trust_domain: str
    device_lifetime: datetime.timedelta
    channel_lifetime: datetime.timedelta
    # The lowest tier that still gets a device certificate (Tier.meets).
    min_tier: Tier
    # Per zone, its lowest tier instead of min_tier (certificates.zone_min_tier).
    zone_min_tier: dict[str, Tier] = field(default_factory=dict)

    def min_tier_for(self, zone: str) -> Tier:
        """The lowest tier that gets a device of ``zone`` a certificate; below it, its live
        certificates are revoked (verifier/revocation.py)."""
        return self.zone_min_tier.get(zone, self.min_tier)


@dataclass(frozen=True)
class RevocationSettings:
    """The revocation feed and CRL (verifier/revocation.py)."""

    crl_interval: datetime.timedelta = datetime.timedelta(seconds=300)
    crl_path: Path | None = None
    max_queued_events: int = 1024


@dataclass(frozen=True)
class EnrollmentSettings:
    trust_domain: str
    require_approval: bool
    require_token: bool
    inventory: Path | None
    # Enroll calls per peer address: a bucket of ``burst``, refilled at rate_per_minute.
    rate_per_minute: float
    burst: int
    max_pending_per_device: int
    max_pending: int
    # EKs allowed without a certificate: sha256 of their SubjectPublicKeyInfo, lower-case.
    allowed_ek_sha256: frozenset[str]


@dataclass(frozen=True)
class QuerySettings:
    trust_domain: str


@dataclass(frozen=True)
class Settings:
    """Every service's section. ``limits`` bounds what one device may send, at the edge
    (verifier/wire.py) and in appraisal (event log size)."""

    trust_domain: str
    attestation: AttestationSettings
    certificates: CertificateSettings
    enrollment: EnrollmentSettings
    query: QuerySettings
    limits: LimitsConfig
    revocation: RevocationSettings = field(default_factory=RevocationSettings)

    @classmethod
    def from_config(cls, cfg: VerifierConfig) -> Settings:
        att, certs, enroll = cfg.attestation, cfg.certificates, cfg.enrollment
        domain = cfg.trust_domain
        return cls(
            trust_domain=domain,
            attestation=AttestationSettings(
                trust_domain=domain,
                selection=att.selection,
                staleness=att.staleness,
                stream=StreamTiming(
                    interval_s=att.interval_s,
                    evidence_timeout_s=att.evidence_timeout_s,
                    hello_timeout_s=att.hello_timeout_s,
                    posture_min_interval_s=att.posture_min_interval_s,
                    posture_notes_per_minute=att.posture_notes_per_minute,
                    stream_challenge_gap_s=att.stream_challenge_gap_s,
                ),
                appraisal_workers=att.appraisal_workers,
                policy_workers=att.policy_workers,
                policy_budget_s=att.policy_budget_s,
            ),
            certificates=CertificateSettings(
                trust_domain=domain,
                device_lifetime=datetime.timedelta(seconds=certs.device_lifetime_s),
                channel_lifetime=datetime.timedelta(seconds=certs.channel_lifetime_s),
                min_tier=certs.min,
                zone_min_tier=certs.zone_min,
            ),
            enrollment=EnrollmentSettings(
                trust_domain=domain,
                require_approval=enroll.require_approval,
                require_token=enroll.require_token,
                inventory=enroll.inventory,
                rate_per_minute=enroll.rate_per_minute,
                burst=enroll.burst,
                max_pending_per_device=enroll.max_pending_per_device,
                max_pending=enroll.max_pending,
                allowed_ek_sha256=frozenset(h.lower() for h in cfg.endorsement.allowed_ek_sha256),
            ),
            query=QuerySettings(trust_domain=domain),
            limits=cfg.limits,
            revocation=RevocationSettings(
                crl_interval=datetime.timedelta(seconds=cfg.revocation.crl_interval_s),
                crl_path=cfg.revocation.crl_path,
                max_queued_events=cfg.revocation.max_queued_events,
            ),
        )
