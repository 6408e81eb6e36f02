"""Devices in the database (``interfaces.Devices``): one page of them filtered and ordered by
SQL, each write audited in its own transaction. Dialect-neutral: the label filter is the
dialect's fragment (``sql.Fragments``).
"""

from __future__ import annotations

import builtins
import datetime
import json
from typing import Any

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.errors import NotFound, Rejected
from devtrust.verifier.records import CertificateRecord, DeviceRecord, DeviceState
from devtrust.verifier.storage import audit_rows, codec
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.enroll import read_token, take_enrollment, use_token
from devtrust.verifier.storage.interfaces import (
    DecideEnrollment,
    DeviceQuery,
    DeviceView,
    FleetCount,
)
from devtrust.verifier.storage.sql import Connection, Engine, Fragments, Row
from devtrust.verifier.storage.trust_rows import INSERT_CERTIFICATE


def device_filters(query: DeviceQuery, sql: Fragments) -> tuple[str, list[Any]]:
    """The WHERE clause of a device query over ``devices d LEFT JOIN trust t``."""
    where = ["d.device_id > ?"]
    args: list[Any] = [query.after]
    if query.zone:
        where.append("d.zone = ?")
        args.append(query.zone)
    for key, value in query.all_labels:
        where.append(sql.label_match)
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


# A revoked device stays revoked: the upsert leaves its row alone (and says so by its row
# count), whatever the caller read before. The condition is read again on the row the write
# locks, so it holds against a revocation committed after the caller's check (review H3).
UPSERT_DEVICE = (
    "INSERT INTO devices (device_id, state, ek_certificate, ek_public, ak_public, "
    "ak_name, host, zone, labels, enrolled_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(device_id) DO UPDATE SET state=excluded.state, "
    "ek_certificate=excluded.ek_certificate, ek_public=excluded.ek_public, "
    "ak_public=excluded.ak_public, ak_name=excluded.ak_name, host=excluded.host, "
    "zone=excluded.zone, labels=excluded.labels, enrolled_at=excluded.enrolled_at "
    "WHERE devices.state <> 'revoked'"
)


def save_device(db: Connection, rec: DeviceRecord, *, now: datetime.datetime, event: str) -> bool:
    """Insert or replace the device, audited as ``event``; False (nothing written) when the
    database holds it revoked."""
    if db.execute(UPSERT_DEVICE, codec.device_to_row(rec)).rowcount != 1:
        return False
    detail = {"ak_name": rec.ak_name, "zone": rec.zone, "labels": rec.labels}
    audit_rows.append(db, at=now, device_id=rec.device_id, event=event, detail=detail)
    return True


def activate_device(
    db: Connection,
    enrollment_id: str,
    *,
    device_id: DeviceId,
    token_sha256: str,
    decide: DecideEnrollment,
    certificate: CertificateRecord | None,
    now: datetime.datetime,
) -> DeviceRecord:
    """An answered enrollment, in the caller's one transaction: see ``Devices.activate``."""
    if not take_enrollment(db, enrollment_id):
        raise NotFound(f"enrollment {enrollment_id} was answered already")
    row = db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    existing = codec.device_from_row(row) if row else None
    revoked = Rejected(f"device {device_id} is revoked")
    if existing is not None and existing.state is DeviceState.REVOKED:
        raise revoked
    token = read_token(db, token_sha256) if token_sha256 else None
    record = decide(existing, token)
    if token_sha256 and not use_token(db, token_sha256, device_id=device_id, now=now):
        raise Rejected(f"device {device_id}: bootstrap token already used")
    if not save_device(db, record, now=now, event=f"enrolled:{record.state.value}"):
        raise revoked
    if certificate is not None and record.state is DeviceState.ENROLLED:
        db.execute(INSERT_CERTIFICATE, codec.certificate_to_row(certificate))
    return record


# Devices by zone, state and tier read at a time (the parameter): one pass over devices
# joined to their trust row by primary key, grouped; the same SQL on both databases.
FLEET_COUNTS = (
    "SELECT d.zone, d.state, CASE WHEN t.device_id IS NULL OR t.expires_at <= ? THEN 'none' "
    "ELSE t.tier END AS tier, COUNT(*) AS n FROM devices d "
    "LEFT JOIN trust t ON t.device_id = d.device_id GROUP BY 1, 2, 3"
)


class SqlDevices:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def get(self, device_id: DeviceId) -> DeviceRecord | None:
        def work(db: Connection) -> DeviceRecord | None:
            row = db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            return codec.device_from_row(row) if row else None

        return await self._engine.read(work)

    async def _page(self, query: DeviceQuery) -> builtins.list[Row]:
        where, args = device_filters(query, self._engine.sql)
        sql = (
            "SELECT d.*, t.result AS trust_result FROM devices d "  # noqa: S608 (no input)
            f"LEFT JOIN trust t ON t.device_id = d.device_id WHERE {where} "
            "ORDER BY d.device_id LIMIT ?"
        )

        def work(db: Connection) -> builtins.list[Row]:
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

    async def fleet_counts(self, now: datetime.datetime) -> builtins.list[FleetCount]:
        def work(db: Connection) -> builtins.list[FleetCount]:
            rows = db.execute(FLEET_COUNTS, (iso(now),)).fetchall()
            return [FleetCount(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

        return await self._engine.read(work)

    async def save(self, rec: DeviceRecord, *, now: datetime.datetime, event: str) -> bool:
        def work(db: Connection) -> bool:
            return save_device(db, rec, now=now, event=event)

        return await self._engine.write(work)

    async def activate(
        self,
        enrollment_id: str,
        *,
        device_id: DeviceId,
        token_sha256: str,
        decide: DecideEnrollment,
        certificate: CertificateRecord | None,
        now: datetime.datetime,
    ) -> DeviceRecord:
        def work(db: Connection) -> DeviceRecord:
            return activate_device(
                db,
                enrollment_id,
                device_id=device_id,
                token_sha256=token_sha256,
                decide=decide,
                certificate=certificate,
                now=now,
            )

        return await self._engine.write(work)

    async def set_state(
        self, device_id: DeviceId, state: DeviceState, *, now: datetime.datetime, event: str
    ) -> bool:
        def work(db: Connection) -> bool:
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
        def work(db: Connection) -> bool:
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
