"""Appraisal decisions in the database (``interfaces.TrustRepository``): the trust row,
last_seen, the audit entry, the TPM state and its event-log parts and the certificate of one
decision, in one transaction, checked against the device's stream lease and standing in that
transaction. Dialect-neutral (``sql``).
"""

from __future__ import annotations

import asyncio
import json

from devtrust.core.ids import DeviceId
from devtrust.verifier.decision import Decision, DeviceChanged, same_standing
from devtrust.verifier.measured_boot import LogPart
from devtrust.verifier.records import DeviceRecord, RevokedCertificate, TpmState
from devtrust.verifier.storage import audit_rows, codec
from devtrust.verifier.storage.changes import check_lease
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.revocations import (
    CERTIFICATES_REVOKED,
    audit_revocation,
    revoke,
)
from devtrust.verifier.storage.sql import Connection, Engine, Row
from devtrust.verifier.trust import TrustResult

INSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial, device_id, kind, not_before, not_after, der) "
    "VALUES (?,?,?,?,?,?)"
)


def record(db: Connection, decision: Decision) -> list[RevokedCertificate]:
    """One decision, in the write's transaction (SQLite: its savepoint of a group
    commit). Refused (Superseded, nothing stored) when its stream lost the device's lease to
    a newer stream. A decision
    whose tier is below its zone's minimum (``revoke_reason``) revokes the device's live
    certificates in the same transaction: those revoked."""
    result = decision.result
    device_id = result.device_id
    check_lease(db, device_id, decision.lease)
    if decision.assumed is not None:
        _check_standing(db, decision.assumed)
    text = codec.result_to_json(result)
    at = iso(result.appraised_at)
    # Which result is newer. A decision with a lease passed check_lease in this transaction:
    # its stream holds the device now, so it is newer than any stored before, whatever the
    # clocks of the replicas that appraised them say (review M2: with a replica's clock
    # ahead, comparing appraised_at across hosts dropped the next replica's results). A
    # decision without one (tests, tools) is never stored over a later one.
    leased = 0 if decision.lease is None else 1
    db.execute(
        "INSERT INTO trust (device_id, tier, score, result, appraised_at, expires_at) "
        "VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
        "tier=excluded.tier, score=excluded.score, result=excluded.result, "
        "appraised_at=excluded.appraised_at, expires_at=excluded.expires_at "
        "WHERE ? = 1 OR excluded.appraised_at >= trust.appraised_at",
        (device_id, result.tier.label, result.score, text, at, iso(result.expires_at), leased),
    )
    if decision.seen:
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
        # Like the trust row, the TPM state and its log only move forward: a leased
        # decision's replace it, an unleased one's never replace a later one.
        cur = db.execute(
            "INSERT INTO tpm_state (device_id, clock, log_data, log_state, pcrs, updated_at) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE "
            "SET clock=excluded.clock, log_data=excluded.log_data, "
            "log_state=excluded.log_state, pcrs=excluded.pcrs, "
            "updated_at=excluded.updated_at "
            "WHERE ? = 1 OR excluded.updated_at >= tpm_state.updated_at",
            (device_id, *codec.tpm_state_to_row(tpm), at, leased),
        )
        if cur.rowcount == 1:
            _append_log_part(db, device_id, tpm)
    if decision.certificate is not None:
        db.execute(INSERT_CERTIFICATE, codec.certificate_to_row(decision.certificate))
    if not decision.revoke_reason:
        return []
    revoked = revoke(db, device_id, reason=decision.revoke_reason, now=result.appraised_at)
    if revoked:
        detail: dict[str, object] = {
            "reason": decision.revoke_reason,
            "serials": [c.serial for c in revoked],
        }
        audit_revocation(
            db,
            device_id,
            CERTIFICATES_REVOKED,
            actor="verifier",
            now=result.appraised_at,
            detail=detail,
        )
    return revoked


def _check_standing(db: Connection, assumed: DeviceRecord) -> None:
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


def _append_log_part(db: Connection, device_id: str, tpm: TpmState) -> None:
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


class SqlTrust:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def record(self, decision: Decision) -> list[RevokedCertificate]:
        return await self._engine.write(lambda db: record(db, decision))

    async def latest(self, device_id: DeviceId) -> TrustResult | None:
        def work(db: Connection) -> str | None:
            row = db.execute(
                "SELECT result FROM trust WHERE device_id = ?", (device_id,)
            ).fetchone()
            return str(row["result"]) if row else None

        text = await self._engine.read(work)
        return codec.result_from_json(text) if text else None

    async def tpm_state(self, device_id: DeviceId, *, with_log: bool = True) -> TpmState | None:
        def work(db: Connection) -> tuple[Row | None, list[LogPart]]:
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
        def work(db: Connection) -> bytes:
            parts = db.execute(
                "SELECT data FROM event_log_parts WHERE device_id = ? ORDER BY part_offset",
                (device_id,),
            ).fetchall()
            return b"".join(bytes(p["data"]) for p in parts)

        return await self._engine.read(work)
