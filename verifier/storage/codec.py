"""The one codec of the verifier's records: trust results and device records as JSON, and
every record from and to the columns of a row. Apart from SQL: a backend hands in rows
(anything indexed by column name) and takes out tuples, whichever database it speaks to.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from typing import Any, Protocol

from devtrust.core.tier import Tier
from devtrust.verifier.measured_boot import LogPart, rebuild
from devtrust.verifier.records import (
    AuditEntry,
    BootstrapToken,
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    PendingEnrollment,
    TpmState,
    iso,
)
from devtrust.verifier.tpm.clock import ClockState
from devtrust.verifier.trust import (
    Claim,
    Finding,
    Severity,
    SubResult,
    TrustResult,
    finding_json,
)

__all__ = [
    "Row",
    "audit_from_row",
    "certificate_to_row",
    "device_from_row",
    "device_to_row",
    "enrollment_from_row",
    "enrollment_to_row",
    "iso",
    "parse_iso",
    "record_from_json",
    "record_to_json",
    "result_from_json",
    "result_to_json",
    "tier_from_label",
    "token_from_row",
    "tpm_state_from_row",
    "tpm_state_to_row",
]


class Row(Protocol):
    """A row read from any database: its columns by name."""

    def __getitem__(self, key: str, /) -> Any: ...


def parse_iso(value: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(value) if value else None


def _when(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value)


# --- trust results ------------------------------------------------------------------------


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
    """The result as JSON, keys sorted. Serialized once per decision: the trust row and the
    audit row store the same text (storage/sqlite.py ``_record``)."""
    head = json.dumps(
        {
            "device_id": result.device_id,
            "claims": {c.value: v for c, v in result.claims.items()},
            "findings": [finding_json(f) for f in result.findings],
            "appraised_at": iso(result.appraised_at),
            "expires_at": iso(result.expires_at),
            "evidence_digest": result.evidence_digest,
            "policy_id": result.policy_id,
        },
        sort_keys=True,
    )
    # "submods" sorts last: the text json.dumps(sort_keys=True) makes of the whole result.
    return f'{head[:-1]}, "submods": {_submods_json(result.submods)}}}'


# The submods' JSON by the identity of their tuple: a device's cached policy outcome hands
# every appraisal the same tuple (8 GPUs: most of a result's text). Each entry holds its
# tuple, so no other tuple can take its id while it is cached; cleared when full.
_SUBMODS: dict[int, tuple[tuple[SubResult, ...], str]] = {}
_SUBMODS_MAX = 4096


def _submods_json(submods: tuple[SubResult, ...]) -> str:
    cached = _SUBMODS.get(id(submods))
    if cached is not None and cached[0] is submods:
        return cached[1]
    text = json.dumps(
        [
            {
                "name": s.name,
                "claims": {c.value: v for c, v in s.claims.items()},
                "findings": [finding_json(f) for f in s.findings],
            }
            for s in submods
        ],
        sort_keys=True,
    )
    if len(_SUBMODS) >= _SUBMODS_MAX:
        _SUBMODS.clear()
    _SUBMODS[id(submods)] = (submods, text)
    return text


def result_from_json(text: str) -> TrustResult:
    d = json.loads(text)
    return TrustResult(
        device_id=d["device_id"],
        claims={Claim(k): int(v) for k, v in d["claims"].items()},
        findings=tuple(_finding_from(f) for f in d["findings"]),
        appraised_at=_when(d["appraised_at"]),
        expires_at=_when(d["expires_at"]),
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


def tier_from_label(label: str) -> Tier | None:
    """The tier stored by its label; None for the empty label (an entry that is no
    appraisal)."""
    return Tier[label.upper()] if label else None


# --- devices ------------------------------------------------------------------------------


def record_to_json(rec: DeviceRecord) -> str:
    """A device record as one JSON text (a pending enrollment keeps the record it makes)."""
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
        enrolled_at=_when(d["enrolled_at"]),
    )


def device_to_row(
    rec: DeviceRecord,
) -> tuple[str, str, bytes, bytes, bytes, str, str, str, str, str]:
    """The columns device_id, state, ek_certificate, ek_public, ak_public, ak_name, host,
    zone, labels, enrolled_at (last_seen is the trust repository's to write)."""
    return (
        rec.device_id,
        rec.state.value,
        rec.ek_certificate,
        rec.ek_public,
        rec.ak_public,
        rec.ak_name,
        json.dumps(rec.host),
        rec.zone,
        json.dumps(rec.labels),
        iso(rec.enrolled_at),
    )


def device_from_row(row: Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        state=DeviceState(row["state"]),
        ek_certificate=bytes(row["ek_certificate"]),
        ek_public=bytes(row["ek_public"]),
        ak_public=bytes(row["ak_public"]),
        ak_name=row["ak_name"],
        host=json.loads(row["host"]),
        zone=row["zone"],
        labels=json.loads(row["labels"]),
        enrolled_at=_when(row["enrolled_at"]),
        last_seen=parse_iso(row["last_seen"]),
    )


# --- enrollments, tokens, certificates, audit ---------------------------------------------


def enrollment_to_row(pending: PendingEnrollment) -> tuple[str, str, str, bytes, bytes, str, str]:
    """The columns enrollment_id, device_id, record, secret, channel_key_spki, expires_at,
    token_sha256."""
    return (
        pending.enrollment_id,
        pending.record.device_id,
        record_to_json(pending.record),
        pending.secret,
        pending.channel_key_spki,
        iso(pending.expires_at),
        pending.token_sha256,
    )


def enrollment_from_row(row: Row) -> PendingEnrollment:
    return PendingEnrollment(
        enrollment_id=row["enrollment_id"],
        record=record_from_json(row["record"]),
        secret=bytes(row["secret"]),
        channel_key_spki=bytes(row["channel_key_spki"]),
        expires_at=_when(row["expires_at"]),
        token_sha256=row["token_sha256"],
    )


def token_from_row(row: Row) -> BootstrapToken:
    return BootstrapToken(
        expires_at=_when(row["expires_at"]),
        used_at=parse_iso(row["used_at"]),
        used_by=row["device_id"] or "",
        zone=row["zone"],
        labels=json.loads(row["labels"]),
    )


def certificate_to_row(cert: CertificateRecord) -> tuple[str, str, str, str, str, bytes]:
    """The columns serial, device_id, kind, not_before, not_after, der."""
    return (
        cert.serial,
        cert.device_id,
        cert.kind,
        iso(cert.not_before),
        iso(cert.not_after),
        cert.der,
    )


def audit_from_row(row: Row) -> AuditEntry:
    return AuditEntry(
        at=_when(row["at"]),
        device_id=row["device_id"],
        event=row["event"],
        tier=tier_from_label(row["tier"]),
        detail=json.loads(row["detail"]),
    )


# --- TPM state ----------------------------------------------------------------------------


def tpm_state_to_row(tpm: TpmState) -> tuple[str, bytes, str, str]:
    """The columns clock, log_data, log_state, pcrs. log_data is always empty: the log is
    kept in its parts (event_log_parts), log_state holds its size, event count and banks."""
    log = tpm.log
    log_state = (
        {}
        if log is None
        else {"offset": log.offset, "event_count": log.event_count, "banks": log.banks}
    )
    pcrs = {b: {str(i): v for i, v in p.items()} for b, p in tpm.pcrs.items()}
    return (json.dumps(tpm.clock.__dict__), b"", json.dumps(log_state), json.dumps(pcrs))


def tpm_state_from_row(row: Row, parts: Iterable[LogPart] | None) -> TpmState:
    """The row and the device's stored log parts; the log is replayed from the parts
    (measured_boot.rebuild), or None when they do not make up the recorded log. ``parts``
    None: the state without its log, nothing replayed."""
    clock = ClockState(**json.loads(row["clock"]))
    state = json.loads(row["log_state"])
    log = None
    if parts is not None and "offset" in state:  # a row from before the parts table: no log
        log = rebuild(parts, offset=state["offset"], event_count=state["event_count"])
    pcrs = {b: {int(i): v for i, v in p.items()} for b, p in json.loads(row["pcrs"]).items()}
    return TpmState(clock=clock, log=log, pcrs=pcrs)
