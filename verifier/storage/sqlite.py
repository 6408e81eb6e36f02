"""The repositories over SQLite (WAL): one writer thread with group commit, reader threads
(``sqlite_engine``), numbered migrations at open (``sqlite_schema``), the codec of
``storage.codec``. Filters and paging are SQL; nothing here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.decision import Decision, DeviceChanged, same_standing
from devtrust.verifier.measured_boot import LogPart
from devtrust.verifier.records import (
    AuditEntry,
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    RevokedCertificate,
    TpmState,
)
from devtrust.verifier.storage import audit_rows, codec
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.interfaces import DeviceQuery, DeviceView
from devtrust.verifier.storage.sqlite_admin import SqliteOperations, SqliteRoles
from devtrust.verifier.storage.sqlite_changes import check_lease
from devtrust.verifier.storage.sqlite_engine import (
    MAX_BATCH,
    CommitHook,
    Readers,
    Writer,
    open_database,
)
from devtrust.verifier.storage.sqlite_enroll import SqliteEnrollments, SqliteTokens
from devtrust.verifier.storage.sqlite_revocation import (
    CERTIFICATES_REVOKED,
    SqliteRevocations,
    _revoke,
)
from devtrust.verifier.storage.sqlite_revocation import _audit as _audit_revocation
from devtrust.verifier.trust import TrustResult

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]
COUNTED = (
    "devices",
    "enrollments",
    "trust",
    "certificates",
    "audit",
    "tpm_state",
    "event_log_parts",
)
_INSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial, device_id, kind, not_before, not_after, der) "
    "VALUES (?,?,?,?,?,?)"
)


class _Engine:
    def __init__(self, location: str, writer: Writer | None, readers: Readers) -> None:
        self.location = location
        self._writer = writer
        self._readers = readers

    async def write(self, work: Work[T]) -> T:
        if self._writer is None:
            raise ValueError(f"database {self.location} is open read-only: nothing is written")
        return await self._writer.run(work)

    async def read(self, work: Work[T]) -> T:
        return await self._readers.run(work)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._readers.close()


# --- devices ------------------------------------------------------------------------------


def _device_filters(query: DeviceQuery) -> tuple[str, list[Any]]:
    """The WHERE clause of a device query over ``devices d LEFT JOIN trust t``."""
    where = ["d.device_id > ?"]
    args: list[Any] = [query.after]
    if query.zone:
        where.append("d.zone = ?")
        args.append(query.zone)
    for key, value in query.all_labels:
        where.append(
            "EXISTS (SELECT 1 FROM json_each(d.labels) AS l WHERE l.key = ? AND l.value = ?)"
        )
        args += [key, value]
    if query.stale_before is not None:
        where.append("(d.last_seen IS NULL OR d.last_seen < ?)")
        args.append(iso(query.stale_before))
    if query.stale_at is not None:
        where.append("(t.device_id IS NULL OR t.expires_at <= ?)")
        args.append(iso(query.stale_at))
    if query.tier is Tier.NONE:
        none = "(t.device_id IS NULL OR t.tier = 'none'"
        if query.now is not None:
            none += " OR t.expires_at <= ?"
            args.append(iso(query.now))
        where.append(none + ")")
    elif query.tier is not None:
        where.append("t.tier = ?")
        args.append(query.tier.label)
        if query.now is not None:
            where.append("t.expires_at > ?")
            args.append(iso(query.now))
    return " AND ".join(where), args


class SqliteDevices:
    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    async def get(self, device_id: DeviceId) -> DeviceRecord | None:
        def work(db: sqlite3.Connection) -> DeviceRecord | None:
            row = db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            return codec.device_from_row(row) if row else None

        return await self._engine.read(work)

    async def _page(self, query: DeviceQuery) -> builtins.list[sqlite3.Row]:
        where, args = _device_filters(query)
        sql = (
            "SELECT d.*, t.result AS trust_result FROM devices d "  # noqa: S608 (no input)
            f"LEFT JOIN trust t ON t.device_id = d.device_id WHERE {where} "
            "ORDER BY d.device_id LIMIT ?"
        )

        def work(db: sqlite3.Connection) -> builtins.list[sqlite3.Row]:
            return db.execute(sql, [*args, query.limit]).fetchall()

        return await self._engine.read(work)

    async def list(self, query: DeviceQuery) -> builtins.list[DeviceRecord]:
        return [codec.device_from_row(row) for row in await self._page(query)]

    async def list_with_trust(self, query: DeviceQuery) -> builtins.list[DeviceView]:
        return [
            DeviceView(
                record=codec.device_from_row(row),
                result=codec.result_from_json(row["trust_result"]) if row["trust_result"] else None,
            )
            for row in await self._page(query)
        ]

    async def save(self, rec: DeviceRecord, *, now: datetime.datetime, event: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO devices (device_id, state, ek_certificate, ek_public, ak_public, "
                "ak_name, host, zone, labels, enrolled_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(device_id) DO UPDATE SET state=excluded.state, "
                "ek_certificate=excluded.ek_certificate, ek_public=excluded.ek_public, "
                "ak_public=excluded.ak_public, ak_name=excluded.ak_name, host=excluded.host, "
                "zone=excluded.zone, labels=excluded.labels, enrolled_at=excluded.enrolled_at",
                codec.device_to_row(rec),
            )
            detail = {"ak_name": rec.ak_name, "zone": rec.zone, "labels": rec.labels}
            audit_rows.append(db, at=now, device_id=rec.device_id, event=event, detail=detail)

        await self._engine.write(work)

    async def set_state(
        self, device_id: DeviceId, state: DeviceState, *, now: datetime.datetime, event: str
    ) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE devices SET state = ? WHERE device_id = ?", (state.value, device_id)
            )
            if cur.rowcount != 1:
                return False
            audit_rows.append(
                db, at=now, device_id=device_id, event=event, detail={"state": state.value}
            )
            return True

        return await self._engine.write(work)

    async def set_assignment(
        self,
        device_id: DeviceId,
        *,
        zone: str,
        labels: dict[str, str],
        now: datetime.datetime,
        event: str,
    ) -> bool:
        def work(db: sqlite3.Connection) -> bool:
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
            audit_rows.append(db, at=now, device_id=device_id, event=event, detail=detail)
            return True

        return await self._engine.write(work)


# --- trust results, TPM state, certificates, audit ----------------------------------------


def _record(db: sqlite3.Connection, decision: Decision) -> list[RevokedCertificate]:
    """One decision, in the writer's transaction (its own savepoint). Refused (Superseded,
    nothing stored) when its stream lost the device's lease to a newer stream. A decision
    whose tier is below its zone's minimum (``revoke_reason``) revokes the device's live
    certificates in the same transaction: those revoked."""
    result = decision.result
    device_id = result.device_id
    check_lease(db, device_id, decision.lease)
    if decision.assumed is not None:
        _check_standing(db, decision.assumed)
    text = codec.result_to_json(result)
    at = iso(result.appraised_at)
    db.execute(
        # Never replaced by an older result (a replaced stream's late appraisal).
        "INSERT INTO trust (device_id, tier, score, result, appraised_at, expires_at) "
        "VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
        "tier=excluded.tier, score=excluded.score, result=excluded.result, "
        "appraised_at=excluded.appraised_at, expires_at=excluded.expires_at "
        "WHERE excluded.appraised_at >= trust.appraised_at",
        (device_id, result.tier.label, result.score, text, at, iso(result.expires_at)),
    )
    db.execute(
        "UPDATE devices SET last_seen = ? WHERE device_id = ? "
        "AND (last_seen IS NULL OR last_seen < ?)",
        (at, device_id, at),
    )
    audit_rows.append(
        db,
        at=result.appraised_at,
        device_id=device_id,
        event="appraisal",
        detail=text,
        tier=result.tier.label,
        actor="device",
    )
    tpm = decision.tpm
    if tpm is not None:
        # Like the trust row, the TPM state and its log only move forward in time: a
        # replaced stream's late appraisal changes neither.
        cur = db.execute(
            "INSERT INTO tpm_state (device_id, clock, log_data, log_state, pcrs, updated_at) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE "
            "SET clock=excluded.clock, log_data=excluded.log_data, "
            "log_state=excluded.log_state, pcrs=excluded.pcrs, "
            "updated_at=excluded.updated_at "
            "WHERE excluded.updated_at >= tpm_state.updated_at",
            (device_id, *codec.tpm_state_to_row(tpm), at),
        )
        if cur.rowcount == 1:
            _append_log_part(db, device_id, tpm)
    if decision.certificate is not None:
        db.execute(_INSERT_CERTIFICATE, codec.certificate_to_row(decision.certificate))
    if not decision.revoke_reason:
        return []
    revoked = _revoke(db, device_id, reason=decision.revoke_reason, now=result.appraised_at)
    if revoked:
        detail: dict[str, object] = {
            "reason": decision.revoke_reason,
            "serials": [c.serial for c in revoked],
        }
        _audit_revocation(
            db,
            device_id,
            CERTIFICATES_REVOKED,
            actor="verifier",
            now=result.appraised_at,
            detail=detail,
        )
    return revoked


def _check_standing(db: sqlite3.Connection, assumed: DeviceRecord) -> None:
    """The device is still as the decision assumed it (state, AK, zone, labels), read in
    the transaction that stores it: otherwise DeviceChanged, and nothing is stored (no
    certificate for a device revoked or moved while its evidence was appraised)."""
    row = db.execute(
        "SELECT state, ak_public, zone, labels FROM devices WHERE device_id = ?",
        (assumed.device_id,),
    ).fetchone()
    if row is not None and same_standing(
        assumed, row[0], bytes(row[1]), row[2], json.loads(row[3])
    ):
        return
    full = db.execute("SELECT * FROM devices WHERE device_id = ?", (assumed.device_id,))
    found = full.fetchone()
    raise DeviceChanged(codec.device_from_row(found) if found is not None else None)


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
        "INSERT INTO event_log_parts (device_id, part_offset, data) VALUES (?,?,?)",
        (device_id, part.offset, part.data),
    )


class SqliteTrust:
    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    async def record(self, decision: Decision) -> list[RevokedCertificate]:
        return await self._engine.write(lambda db: _record(db, decision))

    async def latest(self, device_id: DeviceId) -> TrustResult | None:
        def work(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT result FROM trust WHERE device_id = ?", (device_id,)
            ).fetchone()
            return str(row["result"]) if row else None

        text = await self._engine.read(work)
        return codec.result_from_json(text) if text else None

    async def tpm_state(self, device_id: DeviceId, *, with_log: bool = True) -> TpmState | None:
        def work(db: sqlite3.Connection) -> tuple[sqlite3.Row | None, list[LogPart]]:
            row = db.execute(
                "SELECT clock, log_state, pcrs FROM tpm_state WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if row is None or not with_log:
                return row, []
            parts = db.execute(
                "SELECT part_offset, data FROM event_log_parts WHERE device_id = ? "
                "ORDER BY part_offset",
                (device_id,),
            ).fetchall()
            return row, [LogPart(p["part_offset"], bytes(p["data"])) for p in parts]

        row, parts = await self._engine.read(work)
        if row is None:
            return None
        # The replay is pure CPU on a long log: off the event loop too.
        return await asyncio.to_thread(codec.tpm_state_from_row, row, parts if with_log else None)

    async def event_log(self, device_id: DeviceId) -> bytes:
        def work(db: sqlite3.Connection) -> bytes:
            parts = db.execute(
                "SELECT data FROM event_log_parts WHERE device_id = ? ORDER BY part_offset",
                (device_id,),
            ).fetchall()
            return b"".join(bytes(p["data"]) for p in parts)

        return await self._engine.read(work)


class SqliteCertificates:
    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    async def record(self, cert: CertificateRecord) -> None:
        row = codec.certificate_to_row(cert)

        def work(db: sqlite3.Connection) -> None:
            db.execute(_INSERT_CERTIFICATE, row)

        await self._engine.write(work)


class SqliteAudit:
    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    async def history(self, device_id: DeviceId, *, limit: int = 100) -> list[AuditEntry]:
        def work(db: sqlite3.Connection) -> list[AuditEntry]:
            rows = db.execute(
                "SELECT at, device_id, event, tier, detail FROM audit WHERE device_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (device_id, limit),
            ).fetchall()
            return [codec.audit_from_row(r) for r in rows]

        return await self._engine.read(work)


class SqliteRepositories:
    """Every repository over one SQLite file; made by ``open_sqlite``."""

    def __init__(self, path: Path, engine: _Engine) -> None:
        self._path = path
        self._engine = engine
        self._devices = SqliteDevices(engine)
        self._enrollments = SqliteEnrollments(engine)
        self._tokens = SqliteTokens(engine)
        self._trust = SqliteTrust(engine)
        self._certificates = SqliteCertificates(engine)
        self._audit = SqliteAudit(engine)
        self._revocations = SqliteRevocations(engine)
        self._roles = SqliteRoles(engine)
        self._operations = SqliteOperations(engine)
        self._closed = False

    @property
    def location(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def engine(self) -> _Engine:
        """The writer and readers, for the stores kept in modules of their own
        (sqlite_changes: the change feed and stream leases)."""
        return self._engine

    @property
    def devices(self) -> SqliteDevices:
        return self._devices

    @property
    def enrollments(self) -> SqliteEnrollments:
        return self._enrollments

    @property
    def tokens(self) -> SqliteTokens:
        return self._tokens

    @property
    def trust(self) -> SqliteTrust:
        return self._trust

    @property
    def certificates(self) -> SqliteCertificates:
        return self._certificates

    @property
    def audit(self) -> SqliteAudit:
        return self._audit

    @property
    def revocations(self) -> SqliteRevocations:
        return self._revocations

    @property
    def roles(self) -> SqliteRoles:
        return self._roles

    @property
    def operations(self) -> SqliteOperations:
        return self._operations

    async def counts(self) -> dict[str, int]:
        def work(db: sqlite3.Connection) -> dict[str, int]:
            return {
                t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
                for t in COUNTED
            }

        return await self._engine.read(work)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._engine.close)


async def open_sqlite(
    path: Path,
    *,
    create: bool = True,
    read_only: bool = False,
    readers: int = 4,
    on_commit: CommitHook | None = None,
    max_batch: int = MAX_BATCH,
) -> SqliteRepositories:
    """The verifier's repositories over the SQLite file at ``path``, checked (quick_check)
    and migrated to this code's schema (a newer one is refused; ``read_only`` never
    migrates nor writes). ``on_commit`` sees the size of each committed batch."""
    db, mode = await asyncio.to_thread(open_database, path, create=create, read_only=read_only)
    writer = None if read_only else Writer(db, on_commit=on_commit, max_batch=max_batch)
    if read_only:
        db.close()
    return SqliteRepositories(
        path, _Engine(str(path), writer, Readers(path, mode, workers=readers))
    )
