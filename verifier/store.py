"""Verifier state in SQLite (WAL): devices, pending enrollments, the latest trust result per
device, issued certificates, and an append-only audit trail of every appraisal decision.

Each public method is one transaction. Calls are short (tens of microseconds) and are made
from the event loop; a lock serialises them because the connection is shared.
"""

from __future__ import annotations

import datetime
import json
import math
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from devtrust.verifier.errors import ConfigError, ResourceExhausted
from devtrust.verifier.measured_boot import LogPart
from devtrust.verifier.records import (
    BootstrapToken,
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    PendingEnrollment,
    TpmState,
    iso,
    parse_iso,
    record_from_json,
    record_to_json,
    result_from_json,
    result_to_json,
)
from devtrust.verifier.trust import TrustResult

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
    note TEXT NOT NULL DEFAULT '',
    zone TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS enrollments_device ON enrollments(device_id, expires_at);
CREATE INDEX IF NOT EXISTS enrollments_expiry ON enrollments(expires_at);
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
-- log_state: the event log's size, event count and banks (JSON); the log itself is in
-- event_log_parts. log_data is no longer written (always empty): it stays so that databases
-- made before the log was stored append-only (issue 7) still open; their logs are read again.
CREATE TABLE IF NOT EXISTS tpm_state (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    clock TEXT NOT NULL,
    log_data BLOB NOT NULL,
    log_state TEXT NOT NULL,
    pcrs TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- Each device's event log since its last reboot, in the parts it was accepted in: appended,
-- never rewritten; a part at offset 0 (a new log) replaces the device's older parts.
CREATE TABLE IF NOT EXISTS event_log_parts (
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    part_offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (device_id, part_offset)
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


class Store:
    def __init__(self, path: Path, *, create: bool = True, read_only: bool = False) -> None:
        # Refuse what would hide or lose data (issue 8), one line each: a missing directory, or
        # database (create=False: all but serve), is not made; read_only never writes it.
        named = "--database" if read_only else "`database:`"
        fix = f"fix {named}" + ("" if read_only else " in the configuration")
        if not path.parent.is_dir():
            raise ConfigError(
                f"database {path}: directory {path.parent} does not exist: create it, or {fix} "
                "(it is not created: a typo would show an empty fleet)"
            )
        if (read_only or not create) and not path.is_file():
            raise ConfigError(
                f"no verifier database at {path}: run `devtrust-verifier serve` once, or {fix}"
            )
        self.path = path
        self._lock = threading.Lock()
        db = None
        try:
            if read_only:  # immutable (makes no -wal/-shm) unless a verifier has it open
                ro = "mode=ro" + ("" if Path(f"{path}-wal").exists() else "&immutable=1")
                uri = f"file:{urllib.parse.quote(str(path.resolve()))}?{ro}"
                self._db = db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                self._db = db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems))
            db.row_factory = sqlite3.Row
            if not read_only:
                self._open()
            elif not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                db.close()
                raise ConfigError(f"database {path} holds no verifier data: {fix}; left as it is")
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            name = getattr(exc, "sqlite_errorname", None)
            if name == "SQLITE_NOTADB":
                problem = f"is not an SQLite database: point {named} at the verifier's"
                problem += " database, or move this file away (it is left as it is)"
            elif name in ("SQLITE_CORRUPT", None):
                problem = f"is damaged ({exc}): restore it from a backup, or move it away to"
                problem += " start an empty one (it is left as it is)"
            else:
                problem = f"cannot be opened{'' if read_only else ' for writing'} ({exc}): it must"
                problem += f" be a file, and it and {path.parent} writable by the verifier's user"
            raise ConfigError(f"database {path} {problem}") from exc

    def _open(self) -> None:
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        # executescript commits on its own: the schema is idempotent DDL.
        self._db.executescript(_SCHEMA)
        token_columns = {r[1] for r in self._db.execute("PRAGMA table_info(bootstrap_tokens)")}
        for column, default in (("zone", "''"), ("labels", "'{}'")):  # databases before issue 7
            if column not in token_columns:
                self._db.execute(
                    f"ALTER TABLE bootstrap_tokens ADD COLUMN {column} TEXT NOT NULL "
                    f"DEFAULT {default}"
                )
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

    def put_enrollment(
        self,
        pending: PendingEnrollment,
        *,
        now: datetime.datetime,
        max_per_device: int,
        max_total: int,
    ) -> None:
        """Store a challenge; expired ones are purged first. ResourceExhausted (nothing
        changed) when the device already has ``max_per_device`` challenges waiting, or all
        devices ``max_total``. A waiting challenge is never dropped for a newer one: Enroll
        asks for nothing secret (EK and AK are public), so dropping would let anyone void a
        device's enrollment between its Enroll and its Activate."""
        device_id = pending.record.device_id
        with self._tx() as db:
            db.execute("DELETE FROM enrollments WHERE expires_at < ?", (iso(now),))
            waiting, soonest = db.execute(
                "SELECT COUNT(*), MIN(expires_at) FROM enrollments WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if waiting >= max_per_device:
                wait = (datetime.datetime.fromisoformat(soonest) - now).total_seconds()
                raise ResourceExhausted(
                    f"device {device_id} has {waiting} enrollments awaiting their Activate "
                    f"(enrollment.max_pending_per_device {max_per_device}): answer one, or "
                    f"retry in {max(1, math.ceil(wait))} s"
                )
            total, first = db.execute(
                "SELECT COUNT(*), MIN(expires_at) FROM enrollments"
            ).fetchone()
            if total >= max_total:
                wait = (datetime.datetime.fromisoformat(first) - now).total_seconds()
                raise ResourceExhausted(
                    f"{total} enrollments await their Activate (enrollment.max_pending "
                    f"{max_total}): retry in {max(1, math.ceil(wait))} s"
                )
            db.execute(
                "INSERT INTO enrollments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    pending.enrollment_id,
                    device_id,
                    record_to_json(pending.record),
                    pending.secret,
                    pending.channel_key_spki,
                    iso(pending.expires_at),
                    pending.token_sha256,
                ),
            )

    def get_enrollment(self, enrollment_id: str) -> PendingEnrollment | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM enrollments WHERE enrollment_id = ?", (enrollment_id,)
            ).fetchone()
        if row is None:
            return None
        expires = parse_iso(row["expires_at"])
        assert expires is not None
        return PendingEnrollment(
            enrollment_id=row["enrollment_id"],
            record=record_from_json(row["record"]),
            secret=row["secret"],
            channel_key_spki=row["channel_key_spki"],
            expires_at=expires,
            token_sha256=row["token_sha256"],
        )

    def take_enrollment(self, enrollment_id: str) -> bool:
        """Delete a pending enrollment once its proof checked out; False when another
        answer took it first (a challenge is answered at most once)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM enrollments WHERE enrollment_id = ?", (enrollment_id,))
            return cur.rowcount == 1

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
                    iso(rec.enrolled_at),
                ),
            )
            db.execute(
                "INSERT INTO audit (at, device_id, event, detail) VALUES (?,?,?,?)",
                (
                    iso(now),
                    rec.device_id,
                    event,
                    json.dumps({"ak_name": rec.ak_name, "zone": rec.zone, "labels": rec.labels}),
                ),
            )

    # --- bootstrap tokens (stored as sha256, one use each) ---------------------------------

    def add_token(
        self,
        token_sha256: str,
        *,
        now: datetime.datetime,
        expires_at: datetime.datetime,
        note: str = "",
        zone: str = "",
        labels: dict[str, str] | None = None,
    ) -> None:
        """A one-time token; ``zone`` and ``labels`` are what it assigns to the device that
        first enrolls with it (verifier/inventory.py)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO bootstrap_tokens (token_sha256, created_at, expires_at, note, zone, "
                "labels) VALUES (?,?,?,?,?,?)",
                (token_sha256, iso(now), iso(expires_at), note, zone, json.dumps(labels or {})),
            )

    def get_token(self, token_sha256: str) -> BootstrapToken | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM bootstrap_tokens WHERE token_sha256 = ?", (token_sha256,)
            ).fetchone()
        if row is None:
            return None
        expires = parse_iso(row["expires_at"])
        assert expires is not None
        return BootstrapToken(
            expires_at=expires,
            used_at=parse_iso(row["used_at"]),
            used_by=row["device_id"] or "",
            zone=row["zone"],
            labels=json.loads(row["labels"]),
        )

    def use_token(self, token_sha256: str, *, device_id: str, now: datetime.datetime) -> bool:
        """Spend a token; False when it was spent by another device (or expired) meanwhile.
        The device that spent it may present it again (a retry while pending approval)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE bootstrap_tokens SET used_at = COALESCE(used_at, ?), device_id = ? "
                "WHERE token_sha256 = ? AND ((used_at IS NULL AND expires_at > ?) "
                "OR device_id = ?)",
                (iso(now), device_id, token_sha256, iso(now), device_id),
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
                (iso(now), device_id, event, json.dumps({"state": state.value})),
            )
            return True

    def set_assignment(
        self,
        device_id: str,
        *,
        zone: str,
        labels: dict[str, str],
        now: datetime.datetime,
        event: str,
    ) -> bool:
        """An operator's change of a device's zone and labels, audited with the old ones."""
        with self._tx() as db:
            row = db.execute(
                "SELECT zone, labels FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "UPDATE devices SET zone = ?, labels = ? WHERE device_id = ?",
                (zone, json.dumps(labels), device_id),
            )
            was = {"zone": row["zone"], "labels": json.loads(row["labels"])}
            detail = {"zone": zone, "labels": labels, "was": was}
            db.execute(
                "INSERT INTO audit (at, device_id, event, detail) VALUES (?,?,?,?)",
                (iso(now), device_id, event, json.dumps(detail)),
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
            last_seen=parse_iso(row["last_seen"]),
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
        at = iso(result.appraised_at)
        with self._tx() as db:
            db.execute(
                # Never replaced by an older result (a replaced stream's late appraisal).
                "INSERT INTO trust VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
                "tier=excluded.tier, score=excluded.score, result=excluded.result, "
                "appraised_at=excluded.appraised_at "
                "WHERE excluded.appraised_at >= trust.appraised_at",
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
                # Like the trust row, the TPM state and its log only move forward in time: a
                # replaced stream's late appraisal changes neither.
                cur = db.execute(
                    "INSERT INTO tpm_state VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE "
                    "SET clock=excluded.clock, log_data=excluded.log_data, "
                    "log_state=excluded.log_state, pcrs=excluded.pcrs, "
                    "updated_at=excluded.updated_at "
                    "WHERE excluded.updated_at >= tpm_state.updated_at",
                    (result.device_id, *tpm.to_row(), at),
                )
                if cur.rowcount == 1:
                    self._append_log_part(db, result.device_id, tpm)
            if certificate is not None:
                db.execute(
                    "INSERT INTO certificates (serial, device_id, kind, not_before, not_after, "
                    "der) VALUES (?,?,?,?,?,?)",
                    (
                        certificate.serial,
                        certificate.device_id,
                        certificate.kind,
                        iso(certificate.not_before),
                        iso(certificate.not_after),
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
                    iso(cert.not_before),
                    iso(cert.not_after),
                    cert.der,
                ),
            )

    @staticmethod
    def _append_log_part(db: sqlite3.Connection, device_id: str, tpm: TpmState) -> None:
        """Keep event_log_parts equal to ``tpm.log``: append the part accepted now (a part at
        offset 0 replaces the older ones), or drop the parts of a log the verifier dropped."""
        part = tpm.log_part
        if tpm.log is None:
            db.execute("DELETE FROM event_log_parts WHERE device_id = ?", (device_id,))
            return
        if part is None or (part.offset and not part.data):
            return
        if part.offset + len(part.data) != tpm.log.offset:
            raise ValueError(
                f"event log part {part.offset}+{len(part.data)} does not end the log "
                f"state's {tpm.log.offset} bytes"
            )
        db.execute(
            "DELETE FROM event_log_parts WHERE device_id = ? AND part_offset >= ?",
            (device_id, part.offset),
        )
        db.execute(
            "INSERT INTO event_log_parts VALUES (?,?,?)", (device_id, part.offset, part.data)
        )

    def tpm_state(self, device_id: str, *, with_log: bool = True) -> TpmState | None:
        """What the verifier knows of the device's TPM, with its event log replayed from the
        stored parts, or (``with_log=False``) without the log: a new stream asks for the
        whole log anyway, and replaying a long stored one would be work for nothing."""
        with self._lock:
            row = self._db.execute(
                "SELECT clock, log_state, pcrs FROM tpm_state WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            parts = (
                self._db.execute(
                    "SELECT part_offset, data FROM event_log_parts WHERE device_id = ? "
                    "ORDER BY part_offset",
                    (device_id,),
                ).fetchall()
                if with_log
                else []
            )
        if row is None:
            return None
        state = TpmState.from_row(row, [LogPart(p["part_offset"], bytes(p["data"])) for p in parts])
        return state if with_log else replace(state, log=None)

    def event_log(self, device_id: str) -> bytes:
        """The device's stored event log since its last reboot (its parts joined)."""
        with self._lock:
            parts = self._db.execute(
                "SELECT data FROM event_log_parts WHERE device_id = ? ORDER BY part_offset",
                (device_id,),
            ).fetchall()
        return b"".join(bytes(p["data"]) for p in parts)

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
                for t in (
                    "devices",
                    "enrollments",
                    "trust",
                    "certificates",
                    "audit",
                    "tpm_state",
                    "event_log_parts",
                )
            }
