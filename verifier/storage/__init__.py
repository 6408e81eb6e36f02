"""The verifier's storage: asynchronous repositories (``interfaces``) over SQLite
(``sqlite``) or PostgreSQL (``postgresql``, which replicas share), one repository code for
both (``repositories`` and the modules it names, over ``sql``'s connection protocol), the
records' one codec (``codec``), and numbered schema migrations applied at open (``schema``,
with each backend's dialect).

Callers hold one ``Repositories`` per process, made by ``open_repositories`` from the
configured database (``backends`` picks the backend) and closed at stop; no method reads the
clock.

Every backend has the same numbered migration steps with the same meaning
(``migrations/<dialect>/NNNN_name.sql``, the rule in ``migrations/README.md``): a database at
schema version N holds the same data on any backend.
"""

from __future__ import annotations

from devtrust.verifier.storage.backends import open_repositories
from devtrust.verifier.storage.interfaces import (
    Audit,
    Certificates,
    DeviceQuery,
    Devices,
    DeviceView,
    Enrollments,
    HistoryItem,
    Operations,
    Policies,
    Repositories,
    Revocations,
    Roles,
    StoredPolicy,
    Tokens,
    TrustRepository,
)
from devtrust.verifier.storage.sink import StoreSink
from devtrust.verifier.storage.sqlite import SqliteRepositories, open_sqlite

__all__ = [
    "Audit",
    "Certificates",
    "DeviceQuery",
    "DeviceView",
    "Devices",
    "Enrollments",
    "HistoryItem",
    "Operations",
    "Policies",
    "Repositories",
    "Revocations",
    "Roles",
    "SqliteRepositories",
    "StoreSink",
    "StoredPolicy",
    "Tokens",
    "TrustRepository",
    "open_repositories",
    "open_sqlite",
]
