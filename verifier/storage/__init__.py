"""The verifier's storage: asynchronous repositories (``interfaces``) over SQLite
(``sqlite``; PostgreSQL next, as a module of its own), the records' one codec (``codec``),
and numbered schema migrations (``migrations/``) applied at open.

Callers hold one ``Repositories`` per process, made by ``open_sqlite`` and closed at stop;
no method reads the clock.
"""

from __future__ import annotations

from devtrust.verifier.storage.interfaces import (
    Audit,
    Certificates,
    DeviceQuery,
    Devices,
    DeviceView,
    Enrollments,
    Repositories,
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
    "Repositories",
    "SqliteRepositories",
    "StoreSink",
    "Tokens",
    "TrustRepository",
    "open_sqlite",
]
