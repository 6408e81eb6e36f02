"""What ``devtrust report`` reads of the verifier's database: the devices, their current
results, the appraisals of the period (from the audit trail, where each appraisal's result
is stored whole), the certificates revoked, the policy in force and the audit chains'
verification. Plain values out (``Store``); the figures are ``report_figures``' (pure).

Read as ``devtrust audit`` reads (``audit_db.opened``, never written nor migrated): SQL
with ``?`` marks on SQLite and PostgreSQL alike, in one read-only snapshot, so that a
verifier writing meanwhile shows nothing half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from devtrust.verifier import audit_db

_IN_CHUNK = 500


@dataclass(frozen=True)
class DeviceRow:
    """A device as stored: ``hostname`` is what the device said of itself at enrollment
    (device-supplied: escaped wherever it is shown)."""

    device_id: str
    state: str
    zone: str
    hostname: str
    enrolled_at: datetime.datetime | None
    last_seen: datetime.datetime | None


@dataclass(frozen=True)
class FindingRow:
    id: str
    severity: str
    message: str
    found: str


@dataclass(frozen=True)
class Appraisal:
    """One stored appraisal result (the trust row's, or an audit entry's): its finding ids,
    and the findings whole only for the current results (a period's appraisals can be
    millions: each keeps little, its strings shared)."""

    device_id: str
    at: datetime.datetime
    tier: str
    expires_at: datetime.datetime | None
    policy_id: str
    finding_ids: tuple[str, ...]
    findings: tuple[FindingRow, ...] = ()


@dataclass(frozen=True)
class RevokedCertificate:
    serial: str
    device_id: str
    kind: str
    reason: str
    revoked_at: datetime.datetime


@dataclass(frozen=True)
class PolicyRow:
    policy_id: str
    digest: str
    published_at: str
    published_by: str


@dataclass(frozen=True)
class AuditStatus:
    """``devtrust audit verify``'s answer on the same database: intact or the broken
    records (each one line, the earliest first), and how far it read."""

    intact: bool
    chains: int
    entries: int
    last_id: int
    last_at: str
    broken: tuple[str, ...]


@dataclass(frozen=True)
class Store:
    devices: tuple[DeviceRow, ...]
    current: dict[str, Appraisal]
    # The period's appraisals, in the order they were stored; and each device's last one
    # before the period (its state when the period begins).
    appraisals: tuple[Appraisal, ...]
    before: dict[str, Appraisal]
    # Per finding id, the latest of the period's findings with it (its message, shown as
    # an example).
    examples: dict[str, FindingRow]
    revoked: tuple[RevokedCertificate, ...]
    # Devices revoked by an operator: when (the latest "revoked" audit entry), if recorded.
    device_revoked_at: dict[str, datetime.datetime]
    policy: PolicyRow | None
    audit: AuditStatus
    notes: list[str] = field(default_factory=list)


def when(value: object) -> datetime.datetime | None:
    """A stored time (ISO 8601 text); None for none or one that is no time."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime.datetime):
        found = value
    else:
        try:
            found = datetime.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return found if found.tzinfo is not None else found.replace(tzinfo=datetime.UTC)


def _json(text: object) -> dict[str, Any]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _findings(items: object) -> tuple[FindingRow, ...]:
    if not isinstance(items, list):
        return ()
    return tuple(
        FindingRow(
            id=str(f.get("id", "")),
            severity=str(f.get("severity", "")),
            message=str(f.get("message", "")),
            found=str(f.get("found", "")),
        )
        for f in items
        if isinstance(f, dict)
    )


def appraisal_of(
    device_id: str,
    tier: str,
    detail: object,
    at: object,
    *,
    whole: bool = False,
) -> Appraisal | None:
    """An appraisal from its stored result (JSON, ``codec.result_to_json``), with its
    findings whole when ``whole``; None for a row whose time cannot be read."""
    doc = _json(detail)
    stamp = when(doc.get("appraised_at")) or when(at)
    if stamp is None:
        return None
    findings = _findings(doc.get("findings"))
    return Appraisal(
        device_id=sys.intern(device_id),
        at=stamp,
        tier=sys.intern(tier or "none"),
        expires_at=when(doc.get("expires_at")),
        policy_id=sys.intern(str(doc.get("policy_id") or "")),
        finding_ids=tuple(sys.intern(f.id) for f in findings),
        findings=findings if whole else (),
    )


def _hostname(text: object) -> str:
    name = _json(text).get("hostname")
    return name if isinstance(name, str) else ""


def _stamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat()


def read(
    database: str, *, since: datetime.datetime, until: datetime.datetime, zone: str | None
) -> Store:
    """Everything the report shows, read from ``database`` (ConfigError for a database
    that is none or is newer than this code; the drivers' errors for one unreadable)."""
    with audit_db.opened(database, write=False) as db:
        checked = audit_db.verify(db)
        with db.snapshot():
            return _read(db, checked, since=since, until=until, zone=zone)


def _read(
    db: Any,
    checked: audit_db.Report,
    *,
    since: datetime.datetime,
    until: datetime.datetime,
    zone: str | None,
) -> Store:
    rows = db.rows
    devices = tuple(
        DeviceRow(
            device_id=str(r[0]),
            state=str(r[1]),
            zone=str(r[2]),
            hostname=_hostname(r[3]),
            enrolled_at=when(r[4]),
            last_seen=when(r[5]),
        )
        for r in rows(
            "SELECT device_id, state, zone, host, enrolled_at, last_seen FROM devices "
            "ORDER BY device_id"
        )
        if zone is None or str(r[2]) == zone
    )
    wanted = {d.device_id for d in devices}
    current: dict[str, Appraisal] = {}
    for r in rows("SELECT device_id, tier, result, appraised_at FROM trust"):
        if str(r[0]) in wanted:
            found = appraisal_of(str(r[0]), str(r[1]), r[2], r[3], whole=True)
            if found is not None:
                current[found.device_id] = found
    # A second either side in SQL (times are compared as text there), exact here.
    low, high = since - datetime.timedelta(seconds=1), until + datetime.timedelta(seconds=1)
    appraisals = []
    examples: dict[str, FindingRow] = {}
    for r in rows(
        "SELECT device_id, tier, detail, at FROM audit WHERE event = 'appraisal' "
        "AND at >= ? AND at <= ? ORDER BY id",
        (_stamp(low), _stamp(high)),
    ):
        if str(r[0]) in wanted:
            found = appraisal_of(str(r[0]), str(r[1]), r[2], r[3], whole=True)
            if found is not None and since <= found.at < until:
                examples.update((f.id, f) for f in found.findings)
                appraisals.append(dataclasses.replace(found, findings=()))
    before = _last_before(db, wanted, since)
    revoked = []
    for r in rows(
        "SELECT serial, device_id, kind, revocation_reason, revoked_at FROM certificates "
        "WHERE revoked_at IS NOT NULL AND revoked_at >= ? AND revoked_at <= ? "
        "ORDER BY revoked_at, serial",
        (_stamp(low), _stamp(high)),
    ):
        at = when(r[4])
        if str(r[1]) in wanted and at is not None and since <= at < until:
            revoked.append(RevokedCertificate(str(r[0]), str(r[1]), str(r[2]), str(r[3]), at))
    device_revoked_at: dict[str, datetime.datetime] = {}
    for r in rows("SELECT device_id, at FROM audit WHERE event = 'revoked' ORDER BY id"):
        at = when(r[1])
        if str(r[0]) in wanted and at is not None:
            device_revoked_at[str(r[0])] = at
    policy = next(
        (
            PolicyRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]))
            for r in rows(
                "SELECT policy_id, digest, published_at, published_by FROM policies "
                "WHERE slot = 'current'"
            )
        ),
        None,
    )
    [(last_id, last_at)] = list(rows("SELECT MAX(id), MAX(at) FROM audit"))
    audit = AuditStatus(
        intact=checked.intact,
        chains=checked.chains,
        entries=checked.entries,
        last_id=int(last_id or 0),
        last_at=str(last_at or ""),
        broken=tuple(b.line() for b in checked.broken),
    )
    return Store(
        devices=devices,
        current=current,
        appraisals=tuple(sorted(appraisals, key=lambda a: a.at)),
        before=before,
        examples=examples,
        revoked=tuple(revoked),
        device_revoked_at=device_revoked_at,
        policy=policy,
        audit=audit,
    )


def _last_before(db: Any, wanted: set[str], since: datetime.datetime) -> dict[str, Appraisal]:
    """Each device's last appraisal before ``since``: the latest audit id per device, then
    those entries (a page of ids at a time)."""
    ids = [
        int(r[1])
        for r in db.rows(
            "SELECT device_id, MAX(id) FROM audit WHERE event = 'appraisal' AND at < ? "
            "GROUP BY device_id",
            (_stamp(since),),
        )
        if str(r[0]) in wanted
    ]
    found: dict[str, Appraisal] = {}
    for chunk in _chunks(ids, _IN_CHUNK):
        marks = ",".join("?" * len(chunk))
        for r in db.rows(
            f"SELECT device_id, tier, detail, at FROM audit WHERE id IN ({marks})",  # noqa: S608 - marks only
            chunk,
        ):
            appraisal = appraisal_of(str(r[0]), str(r[1]), r[2], r[3])
            if appraisal is not None and appraisal.at < since:
                found[appraisal.device_id] = appraisal
    return found


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
