"""The verifier's records, apart from SQL and from their encoding: devices, pending
enrollments, bootstrap tokens, certificates, what it remembers of a device's TPM, and audit
entries. ``devtrust.verifier.storage`` keeps them (its ``codec`` turns them into JSON and
rows, its backends into tables); nothing here knows a database.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from devtrust.core.ids import DeviceId, Serial
from devtrust.core.tier import Tier
from devtrust.verifier.measured_boot import LogPart, LogState
from devtrust.verifier.tpm.clock import ClockState


class DeviceState(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    ENROLLED = "enrolled"
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    device_id: DeviceId
    state: DeviceState
    ek_certificate: bytes
    ek_public: bytes
    ak_public: bytes
    ak_name: str
    host: dict[str, Any]
    enrolled_at: datetime.datetime
    zone: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: datetime.datetime | None = None


@dataclass(frozen=True)
class PendingEnrollment:
    enrollment_id: str
    record: DeviceRecord
    secret: bytes
    channel_key_spki: bytes
    expires_at: datetime.datetime
    token_sha256: str = ""


@dataclass(frozen=True)
class BootstrapToken:
    expires_at: datetime.datetime
    used_at: datetime.datetime | None
    used_by: str
    zone: str
    labels: dict[str, str]

    def problem(self, *, device_id: DeviceId, now: datetime.datetime) -> str | None:
        """Why this token cannot enroll ``device_id`` now, or None when it can. The device
        that spent it may present it again: it is known already, and proves its TPM anew."""
        if self.used_at is not None:
            return None if self.used_by == device_id else "bootstrap token already used"
        if self.expires_at <= now:
            return f"bootstrap token expired at {iso(self.expires_at)}"
        return None


@dataclass(frozen=True)
class CertificateRecord:
    serial: Serial
    device_id: DeviceId
    kind: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    der: bytes


@dataclass(frozen=True)
class RevokedCertificate:
    """A device certificate revoked before it expired: on the revocation feed and in the CRL
    until ``not_after``, when it is expired anyway."""

    serial: Serial
    device_id: DeviceId
    not_after: datetime.datetime
    revoked_at: datetime.datetime
    reason: str


@dataclass(frozen=True)
class TpmState:
    """What the verifier remembers of a device's TPM between appraisals."""

    clock: ClockState
    log: LogState | None
    pcrs: dict[str, dict[int, str]]  # the last quoted values: bank -> PCR -> hex
    # The event-log part this appraisal accepted (its offset + bytes = log.offset), which
    # the trust repository appends to the device's stored log; None when no new part was
    # accepted.
    log_part: LogPart | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One line of a device's audit trail: an enrollment, an operator's change, or an
    appraisal (``tier`` is set for appraisals only)."""

    at: datetime.datetime
    device_id: DeviceId
    event: str
    tier: Tier | None
    detail: dict[str, Any]
    # Who made the change: "operator/NAME", "device", "verifier"; "" in entries written
    # before the audit named its actors (schema step 3).
    actor: str = ""
    # Its place in the audit trail (larger is later): where a History page ends.
    seq: int = 0


@dataclass(frozen=True)
class Standing:
    """What operators change on a device (verifier/lifecycle.py): its state, zone and
    labels."""

    state: DeviceState
    zone: str
    labels: dict[str, str]


@dataclass(frozen=True)
class AuditEvent:
    """One audit entry to write: the event's name and what changed."""

    event: str
    detail: dict[str, Any]


def iso(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).isoformat()
