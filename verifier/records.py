"""The verifier's records and their one codec, apart from SQL: devices, pending
enrollments, bootstrap tokens, certificates, what it remembers of a device's TPM, and trust
results as JSON (the trust and audit rows). ``verifier.store`` keeps them in SQLite.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from devtrust.verifier.measured_boot import LogPart, LogState, rebuild
from devtrust.verifier.tpm.clock import ClockState
from devtrust.verifier.trust import Claim, Finding, Severity, SubResult, TrustResult


class DeviceState(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    ENROLLED = "enrolled"
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
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

    def problem(self, *, device_id: str, now: datetime.datetime) -> str | None:
        """Why this token cannot enroll ``device_id`` now, or None when it can. The device
        that spent it may present it again: it is known already, and proves its TPM anew."""
        if self.used_at is not None:
            return None if self.used_by == device_id else "bootstrap token already used"
        if self.expires_at <= now:
            return f"bootstrap token expired at {iso(self.expires_at)}"
        return None


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    device_id: str
    kind: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    der: bytes


@dataclass(frozen=True)
class TpmState:
    """What the verifier remembers of a device's TPM between appraisals."""

    clock: ClockState
    log: LogState | None
    pcrs: dict[str, dict[int, str]]  # the last quoted values: bank -> PCR -> hex
    # The event-log part this appraisal accepted (its offset + bytes = log.offset), which
    # record_appraisal appends to event_log_parts; None when no new part was accepted.
    log_part: LogPart | None = None

    def to_row(self) -> tuple[str, bytes, str, str]:
        log = self.log
        log_state = (
            {}
            if log is None
            else {"offset": log.offset, "event_count": log.event_count, "banks": log.banks}
        )
        pcrs = {b: {str(i): v for i, v in p.items()} for b, p in self.pcrs.items()}
        return (json.dumps(self.clock.__dict__), b"", json.dumps(log_state), json.dumps(pcrs))

    @classmethod
    def from_row(cls, row: sqlite3.Row, parts: list[LogPart]) -> TpmState:
        """The row and the device's stored log parts; the log is replayed from the parts
        (measured_boot.rebuild), or None when they do not make up the recorded log."""
        clock = ClockState(**json.loads(row["clock"]))
        state = json.loads(row["log_state"])
        log = None
        if "offset" in state:  # a row from before the parts table has no log to rebuild
            log = rebuild(parts, offset=state["offset"], event_count=state["event_count"])
        pcrs = {b: {int(i): v for i, v in p.items()} for b, p in json.loads(row["pcrs"]).items()}
        return cls(clock=clock, log=log, pcrs=pcrs)


def iso(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).isoformat()


def parse_iso(value: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(value) if value else None


def _finding_json(f: Finding) -> dict[str, str]:
    return {
        "id": f.id,
        "severity": f.severity.name.lower(),
        "claim": f.claim.value,
        "message": f.message,
        "expected": f.expected,
        "found": f.found,
        "subject": f.subject,
    }


def _finding_from(f: dict[str, str]) -> Finding:
    return Finding(
        id=f["id"],
        severity=Severity[f["severity"].upper()],
        claim=Claim(f["claim"]),
        message=f["message"],
        expected=f["expected"],
        found=f["found"],
        subject=f["subject"],
    )


def result_to_json(result: TrustResult) -> str:
    return json.dumps(
        {
            "device_id": result.device_id,
            "claims": {c.value: v for c, v in result.claims.items()},
            "findings": [_finding_json(f) for f in result.findings],
            "appraised_at": iso(result.appraised_at),
            "expires_at": iso(result.expires_at),
            "evidence_digest": result.evidence_digest,
            "policy_id": result.policy_id,
            "submods": [
                {
                    "name": s.name,
                    "claims": {c.value: v for c, v in s.claims.items()},
                    "findings": [_finding_json(f) for f in s.findings],
                }
                for s in result.submods
            ],
        },
        sort_keys=True,
    )


def result_from_json(text: str) -> TrustResult:
    d = json.loads(text)
    return TrustResult(
        device_id=d["device_id"],
        claims={Claim(k): int(v) for k, v in d["claims"].items()},
        findings=tuple(_finding_from(f) for f in d["findings"]),
        appraised_at=datetime.datetime.fromisoformat(d["appraised_at"]),
        expires_at=datetime.datetime.fromisoformat(d["expires_at"]),
        evidence_digest=d["evidence_digest"],
        policy_id=d["policy_id"],
        submods=tuple(
            SubResult(
                name=s["name"],
                claims={Claim(k): int(v) for k, v in s["claims"].items()},
                findings=tuple(_finding_from(f) for f in s["findings"]),
            )
            for s in d.get("submods", [])
        ),
    )


def record_to_json(rec: DeviceRecord) -> str:
    return json.dumps(
        {
            "device_id": rec.device_id,
            "state": rec.state.value,
            "ek_certificate": rec.ek_certificate.hex(),
            "ek_public": rec.ek_public.hex(),
            "ak_public": rec.ak_public.hex(),
            "ak_name": rec.ak_name,
            "host": rec.host,
            "zone": rec.zone,
            "labels": rec.labels,
            "enrolled_at": iso(rec.enrolled_at),
        }
    )


def record_from_json(text: str) -> DeviceRecord:
    d = json.loads(text)
    return DeviceRecord(
        device_id=d["device_id"],
        state=DeviceState(d["state"]),
        ek_certificate=bytes.fromhex(d["ek_certificate"]),
        ek_public=bytes.fromhex(d["ek_public"]),
        ak_public=bytes.fromhex(d["ak_public"]),
        ak_name=d["ak_name"],
        host=d["host"],
        zone=d["zone"],
        labels=d["labels"],
        enrolled_at=datetime.datetime.fromisoformat(d["enrolled_at"]),
    )
