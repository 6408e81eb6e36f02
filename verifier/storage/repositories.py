"""Every repository over one engine (``sql.Engine``), whichever database is behind it: the
one repository code for SQLite (``sqlite``) and PostgreSQL (``postgresql``). A backend
subclasses ``SqlRepositories`` with its location and its change feed (the one part that
follows the database its own way); everything else, the SQL included, is here and in the
modules it names.
"""

from __future__ import annotations

import asyncio

from devtrust.core.ids import DeviceId
from devtrust.verifier.records import AuditEntry, CertificateRecord
from devtrust.verifier.storage import codec
from devtrust.verifier.storage.admin import SqlOperations, SqlRoles
from devtrust.verifier.storage.changes import ChangeFeed, SqlStreams
from devtrust.verifier.storage.devices import SqlDevices
from devtrust.verifier.storage.enroll import SqlEnrollments, SqlTokens
from devtrust.verifier.storage.policies import SqlPolicies
from devtrust.verifier.storage.revocations import SqlRevocations
from devtrust.verifier.storage.sql import Connection, Engine
from devtrust.verifier.storage.trust_rows import INSERT_CERTIFICATE, SqlTrust

COUNTED = (
    "devices",
    "enrollments",
    "trust",
    "certificates",
    "audit",
    "tpm_state",
    "event_log_parts",
)


class SqlCertificates:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def record(self, cert: CertificateRecord) -> None:
        row = codec.certificate_to_row(cert)

        def work(db: Connection) -> None:
            db.execute(INSERT_CERTIFICATE, row)

        await self._engine.write(work)


class SqlAudit:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def history(self, device_id: DeviceId, *, limit: int = 100) -> list[AuditEntry]:
        def work(db: Connection) -> list[AuditEntry]:
            rows = db.execute(
                "SELECT at, device_id, event, tier, detail FROM audit WHERE device_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (device_id, limit),
            ).fetchall()
            return [codec.audit_from_row(r) for r in rows]

        return await self._engine.read(work)


class SqlRepositories:
    """Every repository over one engine; a backend's subclass adds ``change_feed``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._devices = SqlDevices(engine)
        self._enrollments = SqlEnrollments(engine)
        self._tokens = SqlTokens(engine)
        self._trust = SqlTrust(engine)
        self._certificates = SqlCertificates(engine)
        self._audit = SqlAudit(engine)
        self._revocations = SqlRevocations(engine)
        self._roles = SqlRoles(engine)
        self._operations = SqlOperations(engine)
        self._policies = SqlPolicies(engine)
        self._streams = SqlStreams(engine)
        self._closed = False

    @property
    def location(self) -> str:
        return self._engine.location

    @property
    def engine(self) -> Engine:
        """What runs the work (the stores kept in modules of their own use it)."""
        return self._engine

    @property
    def devices(self) -> SqlDevices:
        return self._devices

    @property
    def enrollments(self) -> SqlEnrollments:
        return self._enrollments

    @property
    def tokens(self) -> SqlTokens:
        return self._tokens

    @property
    def trust(self) -> SqlTrust:
        return self._trust

    @property
    def certificates(self) -> SqlCertificates:
        return self._certificates

    @property
    def audit(self) -> SqlAudit:
        return self._audit

    @property
    def revocations(self) -> SqlRevocations:
        return self._revocations

    @property
    def roles(self) -> SqlRoles:
        return self._roles

    @property
    def operations(self) -> SqlOperations:
        return self._operations

    def policies(self) -> SqlPolicies:
        return self._policies

    def streams(self) -> SqlStreams:
        return self._streams

    def change_feed(self, origin: str) -> ChangeFeed:
        """This process's reader of what the others change (``origin`` names this process
        on the rows it writes)."""
        raise NotImplementedError

    async def counts(self) -> dict[str, int]:
        def work(db: Connection) -> dict[str, int]:
            return {
                t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
                for t in COUNTED
            }

        return await self._engine.read(work)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._engine.close)
