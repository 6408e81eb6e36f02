"""Enrollments awaiting activation and bootstrap tokens (``interfaces.Enrollments``,
``interfaces.Tokens``).

Each works through the engine's ``write`` and ``read`` (dialect-neutral: ``sql``); every
check-then-change runs inside one write transaction (SQLite: the one writer; PostgreSQL:
SERIALIZABLE), so a token is spent once and a device's waiting enrollments stay bounded
across processes.
"""

from __future__ import annotations

import datetime
import json
import math

from devtrust.core.ids import DeviceId
from devtrust.verifier.errors import ResourceExhausted
from devtrust.verifier.records import BootstrapToken, PendingEnrollment
from devtrust.verifier.storage import codec
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.sql import Connection, Engine


def _retry_s(soonest: str, now: datetime.datetime) -> int:
    return max(1, math.ceil((datetime.datetime.fromisoformat(soonest) - now).total_seconds()))


class SqlEnrollments:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def put(
        self,
        pending: PendingEnrollment,
        *,
        now: datetime.datetime,
        max_per_device: int,
        max_total: int,
    ) -> None:
        device_id = pending.record.device_id

        def work(db: Connection) -> None:
            db.execute("DELETE FROM enrollments WHERE expires_at < ?", (iso(now),))
            waiting, soonest = db.execute(
                "SELECT COUNT(*), MIN(expires_at) FROM enrollments WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if waiting >= max_per_device:
                raise ResourceExhausted(
                    f"device {device_id} has {waiting} enrollments awaiting their Activate "
                    f"(enrollment.max_pending_per_device {max_per_device}): answer one, or "
                    f"retry in {_retry_s(soonest, now)} s"
                )
            total, first = db.execute(
                "SELECT COUNT(*), MIN(expires_at) FROM enrollments"
            ).fetchone()
            if total >= max_total:
                raise ResourceExhausted(
                    f"{total} enrollments await their Activate (enrollment.max_pending "
                    f"{max_total}): retry in {_retry_s(first, now)} s"
                )
            db.execute(
                "INSERT INTO enrollments (enrollment_id, device_id, record, secret, "
                "channel_key_spki, expires_at, token_sha256) VALUES (?,?,?,?,?,?,?)",
                codec.enrollment_to_row(pending),
            )

        await self._engine.write(work)

    async def get(self, enrollment_id: str) -> PendingEnrollment | None:
        def work(db: Connection) -> PendingEnrollment | None:
            row = db.execute(
                "SELECT * FROM enrollments WHERE enrollment_id = ?", (enrollment_id,)
            ).fetchone()
            return codec.enrollment_from_row(row) if row else None

        return await self._engine.read(work)

    async def take(self, enrollment_id: str) -> bool:
        def work(db: Connection) -> bool:
            return take_enrollment(db, enrollment_id)

        return await self._engine.write(work)


class SqlTokens:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def add(
        self,
        token_sha256: str,
        *,
        now: datetime.datetime,
        expires_at: datetime.datetime,
        note: str = "",
        zone: str = "",
        labels: dict[str, str] | None = None,
    ) -> None:
        row = (token_sha256, iso(now), iso(expires_at), note, zone, json.dumps(labels or {}))

        def work(db: Connection) -> None:
            db.execute(
                "INSERT INTO bootstrap_tokens (token_sha256, created_at, expires_at, note, zone, "
                "labels) VALUES (?,?,?,?,?,?)",
                row,
            )

        await self._engine.write(work)

    async def get(self, token_sha256: str) -> BootstrapToken | None:
        def work(db: Connection) -> BootstrapToken | None:
            return read_token(db, token_sha256)

        return await self._engine.read(work)

    async def use(self, token_sha256: str, *, device_id: DeviceId, now: datetime.datetime) -> bool:
        def work(db: Connection) -> bool:
            return use_token(db, token_sha256, device_id=device_id, now=now)

        return await self._engine.write(work)


def take_enrollment(db: Connection, enrollment_id: str) -> bool:
    """Delete it; False when another answer took it first."""
    return (
        db.execute("DELETE FROM enrollments WHERE enrollment_id = ?", (enrollment_id,)).rowcount
        == 1
    )


def read_token(db: Connection, token_sha256: str) -> BootstrapToken | None:
    row = db.execute(
        "SELECT * FROM bootstrap_tokens WHERE token_sha256 = ?", (token_sha256,)
    ).fetchone()
    return codec.token_from_row(row) if row else None


def use_token(
    db: Connection, token_sha256: str, *, device_id: DeviceId, now: datetime.datetime
) -> bool:
    """Spend it for ``device_id`` (again: the device that spent it may enroll again with it);
    False when it is unknown, expired or spent by another device."""
    cur = db.execute(
        "UPDATE bootstrap_tokens SET used_at = COALESCE(used_at, ?), device_id = ? "
        "WHERE token_sha256 = ? AND ((used_at IS NULL AND expires_at > ?) "
        "OR device_id = ?)",
        (iso(now), device_id, token_sha256, iso(now), device_id),
    )
    return cur.rowcount == 1
