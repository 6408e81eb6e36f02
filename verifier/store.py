"""Verifier state in SQLite (WAL): devices, pending enrollments, the latest trust result per
device, issued certificates, and an append-only audit trail of every appraisal decision.

Each public method is one transaction. Calls are short (tens of microseconds) and are made
from the event loop; a lock serialises them because the connection is shared.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from verifier.measured_boot import LogState
from verifier.tpm.clock import ClockState
from verifier.tpm.eventlog import ReplayState
from verifier.trust import Claim, Finding, Severity, SubResult, TrustResult

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    ek_certificate BLOB NOT NULL,
    ek_public BLOB NOT NULL,
    ak_public BLOB NOT NULL,
    ak_name TEXT NOT NULL,
    host TEXT NOT NULL,
    zone TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    enrolled_at TEXT NOT NULL,
    last_seen TEXT
);
CREATE TABLE IF NOT EXISTS enrollments (
    enrollment_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    record TEXT NOT NULL,
    secret BLOB NOT NULL,
    channel_key_spki BLOB NOT NULL,
    expires_at TEXT NOT NULL,
    token_sha256 TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
    token_sha256 TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    used_at TEXT,
    device_id TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS trust (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    tier TEXT NOT NULL,
    score INTEGER NOT NULL,
    result TEXT NOT NULL,
    appraised_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    der BLOB NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS tpm_state (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    clock TEXT NOT NULL,
    log_data BLOB NOT NULL,
    log_state TEXT NOT NULL,
    pcrs TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_device ON certificates(device_id, not_after);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    device_id TEXT NOT NULL,
    event TEXT NOT NULL,
    tier TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL
);
"""


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

    def to_row(self) -> tuple[str, bytes, str, str]:
        log = self.log
        log_state = (
            {}
            if log is None
            else {
                "banks": log.banks,
                "pcrs": {
                    b: {str(i): v.hex() for i, v in p.items()} for b, p in log.replay.pcrs.items()
                },
                "measured": sorted(log.replay.measured),
                "seen_pcr0": log.replay.seen_pcr0,
            }
        )
        pcrs = {b: {str(i): v for i, v in p.items()} for b, p in self.pcrs.items()}
        return (
            json.dumps(self.clock.__dict__),
            log.data if log else b"",
            json.dumps(log_state),
            json.dumps(pcrs),
        )

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TpmState:
        clock = ClockState(**json.loads(row["clock"]))
        state = json.loads(row["log_state"])
        log = None
        if state:
            replay = ReplayState(
                pcrs={
                    b: {int(i): bytes.fromhex(v) for i, v in p.items()}
                    for b, p in state["pcrs"].items()
                },
                seen_pcr0=state["seen_pcr0"],
                measured=set(state["measured"]),
            )
            log = LogState(data=bytes(row["log_data"]), banks=state["banks"], replay=replay)
        pcrs = {b: {int(i): v for i, v in p.items()} for b, p in json.loads(row["pcrs"]).items()}
        return cls(clock=clock, log=log, pcrs=pcrs)


def _ts(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).isoformat()


def _dt(value: str | None) -> datetime.datetime | None:
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
            "appraised_at": _ts(result.appraised_at),
            "expires_at": _ts(result.expires_at),
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


def _record_json(rec: DeviceRecord) -> str:
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
            "enrolled_at": _ts(rec.enrolled_at),
        }
    )


def _record_from_json(text: str) -> DeviceRecord:
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


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        # executescript commits on its own: the schema is idempotent DDL.
        self._db.executescript(_SCHEMA)
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- enrollment -----------------------------------------------------------------------

    def put_enrollment(self, pending: PendingEnrollment) -> None:
        with self._tx() as db:
            db.execute(
                "DELETE FROM enrollments WHERE expires_at < ?",
                (_ts(datetime.datetime.now(datetime.UTC)),),
            )
            db.execute(
                "INSERT INTO enrollments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    pending.enrollment_id,
                    pending.record.device_id,
                    _record_json(pending.record),
                    pending.secret,
                    pending.channel_key_spki,
                    _ts(pending.expires_at),
                    pending.token_sha256,
                ),
            )

    def take_enrollment(self, enrollment_id: str) -> PendingEnrollment | None:
        """Remove and return a pending enrollment: a challenge is answered at most once."""
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM enrollments WHERE enrollment_id = ?", (enrollment_id,)
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM enrollments WHERE enrollment_id = ?", (enrollment_id,))
        expires = _dt(row["expires_at"])
        assert expires is not None
        return PendingEnrollment(
            enrollment_id=row["enrollment_id"],
            record=_record_from_json(row["record"]),
            secret=row["secret"],
            channel_key_spki=row["channel_key_spki"],
            expires_at=expires,
            token_sha256=row["token_sha256"],
        )

    def save_device(self, rec: DeviceRecord, *, now: datetime.datetime, event: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO devices (device_id, state, ek_certificate, ek_public, ak_public, "
                "ak_name, host, zone, labels, enrolled_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(device_id) DO UPDATE SET state=excluded.state, "
                "ek_certificate=excluded.ek_certificate, ek_public=excluded.ek_public, "
                "ak_public=excluded.ak_public, ak_name=excluded.ak_name, host=excluded.host, "
                "zone=excluded.zone, labels=excluded.labels, enrolled_at=excluded.enrolled_at",
                (
                    rec.device_id,
                    rec.state.value,
                    rec.ek_certificate,
                    rec.ek_public,
                    rec.ak_public,
                    rec.ak_name,
                    json.dumps(rec.host),
                    rec.zone,
                    json.dumps(rec.labels),
                    _ts(rec.enrolled_at),
                ),
            )
            db.execute(
                "INSERT INTO audit (at, device_id, event, detail) VALUES (?,?,?,?)",
                (_ts(now), rec.device_id, event, json.dumps({"ak_name": rec.ak_name})),
            )

    # --- bootstrap tokens (stored as sha256, one use each) ---------------------------------

    def add_token(
        self,
        token_sha256: str,
        *,
        now: datetime.datetime,
        expires_at: datetime.datetime,
        note: str = "",
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO bootstrap_tokens (token_sha256, created_at, expires_at, note) "
                "VALUES (?,?,?,?)",
                (token_sha256, _ts(now), _ts(expires_at), note),
            )

    def token_problem(self, token_sha256: str, *, now: datetime.datetime) -> str | None:
        """Why this token cannot enroll a device now, or None when it can."""
        with self._lock:
            row = self._db.execute(
                "SELECT expires_at, used_at FROM bootstrap_tokens WHERE token_sha256 = ?",
                (token_sha256,),
            ).fetchone()
        if row is None:
            return "unknown bootstrap token"
        if row["used_at"] is not None:
            return "bootstrap token already used"
        if datetime.datetime.fromisoformat(row["expires_at"]) <= now:
            return f"bootstrap token expired at {row['expires_at']}"
        return None

    def use_token(self, token_sha256: str, *, device_id: str, now: datetime.datetime) -> bool:
        """Spend a token; False when it was spent (or expired) meanwhile."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE bootstrap_tokens SET used_at = ?, device_id = ? WHERE token_sha256 = ? "
                "AND used_at IS NULL AND expires_at > ?",
                (_ts(now), device_id, token_sha256, _ts(now)),
            )
            return cur.rowcount == 1

    def set_state(
        self, device_id: str, state: DeviceState, *, now: datetime.datetime, event: str
    ) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE devices SET state = ? WHERE device_id = ?", (state.value, device_id)
            )
            if cur.rowcount != 1:
                return False
            db.execute(
                "INSERT INTO audit (at, device_id, event, detail) VALUES (?,?,?,?)",
                (_ts(now), device_id, event, json.dumps({"state": state.value})),
            )
            return True

    # --- devices --------------------------------------------------------------------------

    @staticmethod
    def _device(row: sqlite3.Row) -> DeviceRecord:
        return DeviceRecord(
            device_id=row["device_id"],
            state=DeviceState(row["state"]),
            ek_certificate=row["ek_certificate"],
            ek_public=row["ek_public"],
            ak_public=row["ak_public"],
            ak_name=row["ak_name"],
            host=json.loads(row["host"]),
            zone=row["zone"],
            labels=json.loads(row["labels"]),
            enrolled_at=datetime.datetime.fromisoformat(row["enrolled_at"]),
            last_seen=_dt(row["last_seen"]),
        )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return self._device(row) if row else None

    def list_devices(
        self,
        *,
        zone: str = "",
        after: str = "",
        limit: int = 100,
    ) -> list[DeviceRecord]:
        query = "SELECT * FROM devices WHERE device_id > ?"
        args: list[Any] = [after]
        if zone:
            query += " AND zone = ?"
            args.append(zone)
        query += " ORDER BY device_id LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [self._device(r) for r in rows]

    # --- results and certificates ---------------------------------------------------------

    def record_appraisal(
        self,
        result: TrustResult,
        *,
        certificate: CertificateRecord | None,
        tpm: TpmState | None = None,
    ) -> None:
        """The latest result, its audit entry, the device's TPM state and any certificate
        issued, in one transaction."""
        text = result_to_json(result)
        at = _ts(result.appraised_at)
        with self._tx() as db:
            db.execute(
                "INSERT INTO trust VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
                "tier=excluded.tier, score=excluded.score, result=excluded.result, "
                "appraised_at=excluded.appraised_at",
                (result.device_id, result.tier.label, result.score, text, at),
            )
            db.execute(
                "UPDATE devices SET last_seen = ? WHERE device_id = ?", (at, result.device_id)
            )
            db.execute(
                "INSERT INTO audit (at, device_id, event, tier, detail) VALUES (?,?,?,?,?)",
                (at, result.device_id, "appraisal", result.tier.label, text),
            )
            if tpm is not None:
                db.execute(
                    "INSERT INTO tpm_state VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE "
                    "SET clock=excluded.clock, log_data=excluded.log_data, "
                    "log_state=excluded.log_state, pcrs=excluded.pcrs, "
                    "updated_at=excluded.updated_at",
                    (result.device_id, *tpm.to_row(), at),
                )
            if certificate is not None:
                db.execute(
                    "INSERT INTO certificates (serial, device_id, kind, not_before, not_after, "
                    "der) VALUES (?,?,?,?,?,?)",
                    (
                        certificate.serial,
                        certificate.device_id,
                        certificate.kind,
                        _ts(certificate.not_before),
                        _ts(certificate.not_after),
                        certificate.der,
                    ),
                )

    def record_certificate(self, cert: CertificateRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO certificates (serial, device_id, kind, not_before, not_after, der) "
                "VALUES (?,?,?,?,?,?)",
                (
                    cert.serial,
                    cert.device_id,
                    cert.kind,
                    _ts(cert.not_before),
                    _ts(cert.not_after),
                    cert.der,
                ),
            )

    def tpm_state(self, device_id: str) -> TpmState | None:
        with self._lock:
            row = self._db.execute(
                "SELECT clock, log_data, log_state, pcrs FROM tpm_state WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return TpmState.from_row(row) if row else None

    def latest_result(self, device_id: str) -> TrustResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM trust WHERE device_id = ?", (device_id,)
            ).fetchone()
        return result_from_json(row["result"]) if row else None

    def counts(self) -> dict[str, int]:
        """Row counts per table (tests check that bad input wrote nothing)."""
        with self._lock:
            return {
                t: int(self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
                for t in ("devices", "enrollments", "trust", "certificates", "audit", "tpm_state")
            }
