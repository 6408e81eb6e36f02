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
from devtrust.verifier.records import DeviceRecord, DeviceState
from devtrust.verifier.storage import audit_rows, codec
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.interfaces import DeviceQuery, DeviceView
from devtrust.verifier.storage.sql import Connection, Engine, Fragments, Row


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

    async def save(self, rec: DeviceRecord, *, now: datetime.datetime, event: str) -> None:
        def work(db: Connection) -> None:
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
