"""Attestation results in the vocabulary of draft-ietf-rats-ar4si: a trustworthiness vector
of eight claims, each a small integer whose range gives its tier, an overall tier (the worst
asserted claim), a 0-100 score and the findings that explain it. Pure values, no I/O.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier


class Claim(StrEnum):
    """AR4SI trustworthiness claims (draft-ietf-rats-ar4si, 2.3)."""

    INSTANCE_IDENTITY = "instance-identity"
    CONFIGURATION = "configuration"
    EXECUTABLES = "executables"
    FILE_SYSTEM = "file-system"
    HARDWARE = "hardware"
    RUNTIME_OPAQUE = "runtime-opaque"
    STORAGE_OPAQUE = "storage-opaque"
    SOURCED_DATA = "sourced-data"


# Values used here (draft-ietf-rats-ar4si, 2.3; the same codes as Veraison's EAR library).
NO_CLAIM = 0
VERIFIER_MALFUNCTION = -1
CRYPTO_VALIDATION_FAILED = 99
IDENTITY_RECOGNIZED = 2  # recognized, not known to be compromised
IDENTITY_UNRECOGNIZED = 97
HARDWARE_GENUINE = 2
HARDWARE_UNRECOGNIZED = 97
EXECUTABLES_APPROVED_BOOT = 3  # only approved executables loaded during boot
EXECUTABLES_UNRECOGNIZED = 33
EXECUTABLES_CONTRAINDICATED = 96
CONFIGURATION_APPROVED = 2
CONFIGURATION_VULNERABLE = 32
CONFIGURATION_UNSAFE = 96


def tier_of(value: int) -> Tier:
    """Tier of an AR4SI claim value (draft-ietf-rats-ar4si, 2.3.1)."""
    magnitude = abs(value)
    if magnitude <= 1:
        return Tier.NONE
    if magnitude <= 31:
        return Tier.AFFIRMING
    if magnitude <= 95:
        return Tier.WARNING
    return Tier.CONTRAINDICATED


class Severity(IntEnum):
    INFO = 1
    WARNING = 2
    CONTRAINDICATED = 3


@dataclass(frozen=True, slots=True)
class Finding:
    """A reason, with a stable dotted id (``tpm.quote.nonce_mismatch``)."""

    id: str
    severity: Severity
    claim: Claim
    message: str
    expected: str = ""
    found: str = ""
    subject: str = ""


def finding_json(f: Finding) -> dict[str, str]:
    """A finding as JSON: the one shape of stored results, EARs and every ``--json``."""
    return {
        "id": f.id,
        "severity": f.severity.name.lower(),
        "claim": f.claim.value,
        "message": f.message,
        "expected": f.expected,
        "found": f.found,
        "subject": f.subject,
    }


@dataclass(frozen=True)
class SubResult:
    """One component's own result under the host's (EAR submods): a GPU."""

    name: str
    claims: dict[Claim, int]
    findings: tuple[Finding, ...]

    @property
    def tier(self) -> Tier:
        return overall_tier(self.claims)


@dataclass(frozen=True)
class TrustResult:
    device_id: DeviceId
    claims: dict[Claim, int]
    findings: tuple[Finding, ...]
    appraised_at: datetime.datetime
    expires_at: datetime.datetime
    evidence_digest: str = ""
    policy_id: str = ""
    submods: tuple[SubResult, ...] = ()
    tier: Tier = field(init=False)
    score: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tier", overall_tier(self.claims))
        object.__setattr__(self, "score", trust_score(self.claims))

    def at(self, now: datetime.datetime) -> TrustResult:
        """This result as seen at ``now``: past ``expires_at`` every claim is void (tier none)."""
        if now < self.expires_at:
            return self
        stale = Finding(
            id="freshness.stale",
            severity=Severity.WARNING,
            claim=Claim.INSTANCE_IDENTITY,
            message=f"device {self.device_id}: last evidence appraised at "
            f"{self.appraised_at.isoformat()} is past its staleness bound "
            f"{self.expires_at.isoformat()}",
        )
        return TrustResult(
            device_id=self.device_id,
            claims={},
            findings=(*self.findings, stale),
            appraised_at=self.appraised_at,
            expires_at=self.expires_at,
            evidence_digest=self.evidence_digest,
            policy_id=self.policy_id,
            submods=tuple(SubResult(s.name, {}, s.findings) for s in self.submods),
        )


def overall_tier(claims: dict[Claim, int]) -> Tier:
    """The worst tier among asserted claims; none when nothing was asserted."""
    tiers = [tier_of(v) for v in claims.values() if v != NO_CLAIM]
    return max(tiers) if tiers else Tier.NONE


# Score: 100 x the mean, over asserted claims, of affirming 1.0, warning 0.5,
# contraindicated 0.0; capped at 20 when any claim is contraindicated and at 0 when
# nothing is asserted (or the verifier malfunctioned). A dashboard number; gates use tiers.
_TIER_WEIGHT = {Tier.AFFIRMING: 1.0, Tier.WARNING: 0.5, Tier.CONTRAINDICATED: 0.0}


def trust_score(claims: dict[Claim, int]) -> int:
    asserted = [tier_of(v) for v in claims.values() if v != NO_CLAIM]
    if not asserted or any(t is Tier.NONE for t in asserted):
        return 0
    score = round(100 * sum(_TIER_WEIGHT[t] for t in asserted) / len(asserted))
    if Tier.CONTRAINDICATED in asserted:
        score = min(score, 20)
    return score
