"""Operators' side of the database: their roles (``interfaces.Roles``), their changes to
devices and the audit trail in pages (``interfaces.Operations``). Tables and columns of
migration 0003 (``roles``, ``audit.actor``), through the engine's ``write`` and ``read`` like
every other repository (dialect-neutral: ``sql``).

A change is a compare-and-set: the device's state, zone and labels are read and compared
with what the change was computed from inside the write's transaction, so two operators
(or an operator and the inventory) changing one device at once never overwrite each other
unseen; the caller reads the device again and recomputes.
"""

from __future__ import annotations

import builtins
import datetime
import json
from collections.abc import Sequence

from devtrust.core.ids import DeviceId
from devtrust.verifier.audit_chain import Event
from devtrust.verifier.records import AuditEntry, AuditEvent, DeviceState, Standing
from devtrust.verifier.storage import audit_rows, codec
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.interfaces import HistoryItem
from devtrust.verifier.storage.sql import Connection, Engine, Row

APPRAISAL = "appraisal"


class SqlRoles:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def get(self, name: str) -> str | None:
        def work(db: Connection) -> str | None:
            row = db.execute("SELECT role FROM roles WHERE name = ?", (name,)).fetchone()
            return str(row["role"]) if row else None

        return await self._engine.read(work)

    async def set(
        self, name: str, role: str | None, *, now: datetime.datetime, actor: str
    ) -> str | None:
        def work(db: Connection) -> str | None:
            row = db.execute("SELECT role FROM roles WHERE name = ?", (name,)).fetchone()
            if role is None:
                db.execute("DELETE FROM roles WHERE name = ?", (name,))
            else:
                db.execute(
                    "INSERT INTO roles (name, role, updated_at, updated_by) VALUES (?,?,?,?) "
                    "ON CONFLICT(name) DO UPDATE SET role=excluded.role, "
                    "updated_at=excluded.updated_at, updated_by=excluded.updated_by",
                    (name, role, iso(now), actor),
                )
            was = str(row["role"]) if row else None
            detail = {"name": name, "role": role, "was": was}
            audit_rows.append(
                db, at=now, device_id="", event=Event.ROLE_CHANGED, detail=detail, actor=actor
            )
            return was

        return await self._engine.write(work)

    async def all(self) -> dict[str, str]:
        def work(db: Connection) -> dict[str, str]:
            rows = db.execute("SELECT name, role FROM roles ORDER BY name").fetchall()
            return {str(r["name"]): str(r["role"]) for r in rows}

        return await self._engine.read(work)


def _standing(row: Row) -> Standing:
    return Standing(
        state=DeviceState(row["state"]), zone=row["zone"], labels=json.loads(row["labels"])
    )


def _entry(row: Row) -> HistoryItem:
    entry = AuditEntry(
        at=datetime.datetime.fromisoformat(row["at"]),
        device_id=DeviceId(row["device_id"]),
        event=row["event"],
        tier=codec.tier_from_label(row["tier"]),
        # An appraisal's detail is its whole result, decoded below: not twice.
        detail={} if row["event"] == APPRAISAL else json.loads(row["detail"]),
        actor=row["actor"],
        seq=int(row["id"]),
    )
    result = codec.result_from_json(row["detail"]) if row["event"] == APPRAISAL else None
    return HistoryItem(entry=entry, result=result)


class SqlOperations:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def apply(
        self,
        device_id: DeviceId,
        *,
        before: Standing,
        after: Standing,
        events: Sequence[AuditEvent],
        actor: str,
        now: datetime.datetime,
    ) -> bool:
        def work(db: Connection) -> bool:
            row = db.execute(
                "SELECT state, zone, labels FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None or _standing(row) != before:
                return False
            db.execute(
                "UPDATE devices SET state = ?, zone = ?, labels = ? WHERE device_id = ?",
                (after.state.value, after.zone, json.dumps(after.labels), device_id),
            )
            for event in events:
                audit_rows.append(
                    db,
                    at=now,
                    device_id=device_id,
                    event=event.event,
                    detail=event.detail,
                    actor=actor,
                )
            return True

        return await self._engine.write(work)

    async def history(
        self, device_id: DeviceId, *, before_seq: int | None, limit: int
    ) -> builtins.list[HistoryItem]:
        # The index audit_device (device_id, id) serves both the filter and the order.
        sql = (
            "SELECT id, at, device_id, event, tier, detail, actor FROM audit "
            "WHERE device_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
        )
        below = before_seq if before_seq is not None else 2**63 - 1

        def work(db: Connection) -> builtins.list[Row]:
            return db.execute(sql, (device_id, below, limit)).fetchall()

        return [_entry(row) for row in await self._engine.read(work)]
