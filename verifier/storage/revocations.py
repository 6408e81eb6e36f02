"""Revoked certificates (``interfaces.Revocations``): the ``certificates`` table's
``revoked_at`` and ``revocation_reason`` (migration 0004), through the engine's ``write`` and
``read`` like every other repository (dialect-neutral: ``sql``).

A revocation is one transaction: the certificates it revokes, the device's state when an
operator revokes the device, and its audit entry. The automatic revocation of a device whose
tier fell reads first and writes only when there is something to revoke: a device that
stays untrusted costs its appraisals no second write.
"""

from __future__ import annotations

import datetime

from devtrust.core.ids import DeviceId, Serial
from devtrust.verifier.records import CertificateRecord, DeviceState, RevokedCertificate
from devtrust.verifier.storage import audit_rows
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.sql import Connection, Engine, Row

# Only device certificates are revoked here: the CRL is the device issuing CA's, and a
# channel certificate's device is refused by its state (DeviceState.REVOKED) instead.
DEVICE = "device"
_LIVE_OF_DEVICE = (
    "SELECT serial, device_id, kind, not_before, not_after, der FROM certificates "
    "WHERE device_id = ? AND kind = ? AND revoked_at IS NULL AND not_after > ? "
    "ORDER BY not_after, serial"
)
# Audit events.
DEVICE_REVOKED = "revoked"
CERTIFICATES_REVOKED = "certificates_revoked"


def _when(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def _certificate(row: Row) -> CertificateRecord:
    return CertificateRecord(
        serial=Serial(row["serial"]),
        device_id=DeviceId(row["device_id"]),
        kind=row["kind"],
        not_before=_when(row["not_before"]),
        not_after=_when(row["not_after"]),
        der=bytes(row["der"]),
    )


def revoke(
    db: Connection,
    device_id: DeviceId,
    *,
    reason: str,
    now: datetime.datetime,
) -> list[RevokedCertificate]:
    """Revoke the device's live certificates in the open transaction; those revoked."""
    rows = db.execute(_LIVE_OF_DEVICE, (device_id, DEVICE, iso(now))).fetchall()
    revoked = [
        RevokedCertificate(
            serial=Serial(row["serial"]),
            device_id=device_id,
            not_after=_when(row["not_after"]),
            revoked_at=now,
            reason=reason,
        )
        for row in rows
    ]
    db.executemany(
        "UPDATE certificates SET revoked_at = ?, revocation_reason = ? WHERE serial = ?",
        [(iso(now), reason, cert.serial) for cert in revoked],
    )
    return revoked


def audit_revocation(
    db: Connection,
    device_id: DeviceId,
    event: str,
    *,
    actor: str,
    now: datetime.datetime,
    detail: dict[str, object],
) -> None:
    audit_rows.append(db, at=now, device_id=device_id, event=event, detail=detail, actor=actor)


class SqlRevocations:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def revoke_device(
        self, device_id: DeviceId, *, reason: str, actor: str, now: datetime.datetime
    ) -> list[RevokedCertificate] | None:
        def work(db: Connection) -> list[RevokedCertificate] | None:
            cur = db.execute(
                "UPDATE devices SET state = ? WHERE device_id = ?",
                (DeviceState.REVOKED.value, device_id),
            )
            if cur.rowcount != 1:
                return None
            revoked = revoke(db, device_id, reason=reason, now=now)
            detail: dict[str, object] = {
                "state": DeviceState.REVOKED.value,
                "reason": reason,
                "serials": [c.serial for c in revoked],
            }
            audit_revocation(db, device_id, DEVICE_REVOKED, actor=actor, now=now, detail=detail)
            return revoked

        return await self._engine.write(work)

    async def revoke_certificates(
        self, device_id: DeviceId, *, reason: str, actor: str, now: datetime.datetime
    ) -> list[RevokedCertificate]:
        if not await self.live_certificates(device_id, now):
            return []

        def work(db: Connection) -> list[RevokedCertificate]:
            revoked = revoke(db, device_id, reason=reason, now=now)
            if revoked:
                detail: dict[str, object] = {
                    "reason": reason,
                    "serials": [c.serial for c in revoked],
                }
                audit_revocation(
                    db, device_id, CERTIFICATES_REVOKED, actor=actor, now=now, detail=detail
                )
            return revoked

        return await self._engine.write(work)

    async def live(self, now: datetime.datetime) -> list[RevokedCertificate]:
        def work(db: Connection) -> list[RevokedCertificate]:
            rows = db.execute(
                "SELECT serial, device_id, not_after, revoked_at, revocation_reason "
                "FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ? "
                "ORDER BY revoked_at, serial",
                (iso(now),),
            ).fetchall()
            return [
                RevokedCertificate(
                    serial=Serial(row["serial"]),
                    device_id=DeviceId(row["device_id"]),
                    not_after=_when(row["not_after"]),
                    revoked_at=_when(row["revoked_at"]),
                    reason=row["revocation_reason"],
                )
                for row in rows
            ]

        return await self._engine.read(work)

    async def live_certificates(
        self, device_id: DeviceId, now: datetime.datetime
    ) -> list[CertificateRecord]:
        def work(db: Connection) -> list[CertificateRecord]:
            rows = db.execute(_LIVE_OF_DEVICE, (device_id, DEVICE, iso(now))).fetchall()
            return [_certificate(row) for row in rows]

        return await self._engine.read(work)
