"""The policy every replica appraises with (``interfaces.Policies``, migration 0006): the
current policy's id, digest and documents (every file it was loaded from, as text), so a
replica loads the identical policy from the database without files of its own. Publishing
one is a single transaction: the row, a ``policy`` row on the change feed (the others
reload) and an audit entry.
"""

from __future__ import annotations

import datetime
import json

from devtrust.verifier.audit_chain import Event
from devtrust.verifier.storage import audit_rows
from devtrust.verifier.storage.changes import POLICY, insert_change
from devtrust.verifier.storage.codec import iso
from devtrust.verifier.storage.interfaces import StoredPolicy
from devtrust.verifier.storage.sql import Connection, Engine

_CURRENT = "current"


class SqlPolicies:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def publish(
        self, policy: StoredPolicy, *, actor: str, origin: str, now: datetime.datetime
    ) -> None:
        documents = json.dumps(policy.documents, sort_keys=True)

        def work(db: Connection) -> None:
            db.execute(
                "INSERT INTO policies (slot, policy_id, digest, documents, published_at, "
                "published_by) VALUES (?,?,?,?,?,?) ON CONFLICT(slot) DO UPDATE SET "
                "policy_id=excluded.policy_id, digest=excluded.digest, "
                "documents=excluded.documents, published_at=excluded.published_at, "
                "published_by=excluded.published_by",
                (
                    _CURRENT,
                    policy.policy_id,
                    policy.digest,
                    documents,
                    iso(policy.published_at),
                    actor,
                ),
            )
            insert_change(db, POLICY, device_id="", ref=policy.digest, origin=origin)
            detail = {"policy_id": policy.policy_id, "digest": policy.digest}
            audit_rows.append(
                db, at=now, device_id="", event=Event.POLICY_CHANGED, detail=detail, actor=actor
            )

        await self._engine.write(work)

    async def current(self) -> StoredPolicy | None:
        def work(db: Connection) -> StoredPolicy | None:
            row = db.execute(
                "SELECT policy_id, digest, documents, published_at FROM policies WHERE slot = ?",
                (_CURRENT,),
            ).fetchone()
            if row is None:
                return None
            return StoredPolicy(
                policy_id=str(row["policy_id"]),
                digest=str(row["digest"]),
                documents=dict(json.loads(row["documents"])),
                published_at=datetime.datetime.fromisoformat(row["published_at"]),
            )

        return await self._engine.read(work)
