"""Which backend a configured database names, and opening it: the one place that knows the
backends. A file (a path, or sqlite:///PATH) is SQLite; a server's URL goes to the backend of
its scheme. A backend is a module of its own (``sqlite``; PostgreSQL with issue 12) plus its
line in ``_SERVERS``; callers never name one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import DatabaseUrl, database_location
from devtrust.verifier.storage.interfaces import Repositories
from devtrust.verifier.storage.sqlite import open_sqlite

# scheme -> open(url, create=, read_only=). PostgreSQL (issue 12) adds its line here.
OpenServer = Callable[..., Awaitable[Repositories]]
_SERVERS: dict[str, OpenServer] = {}
_LATER = {
    "postgresql": "PostgreSQL comes with issue 12 (replicas sharing one PostgreSQL)",
    "postgres": "PostgreSQL comes with issue 12 (replicas sharing one PostgreSQL)",
}


async def open_repositories(
    database: Path | str, *, create: bool = True, read_only: bool = False
) -> Repositories:
    """The verifier's repositories over ``database``: a Path is an SQLite file; a string is
    read as `database:` is (a path relative to the working directory, sqlite:///PATH, or a
    server's URL). ``create`` False: a database that does not exist is an error, never
    made; ``read_only``: nothing is migrated nor written. ConfigError for a database this
    devtrust cannot use, naming the forms it can."""
    if isinstance(database, Path):
        location: Path | DatabaseUrl = database
    else:
        try:
            location = database_location(database)
        except ValueError as exc:
            raise ConfigError(f"database {exc}") from None
    if isinstance(location, Path):
        return await open_sqlite(location, create=create, read_only=read_only)
    opener = _SERVERS.get(location.scheme)
    if opener is None:
        later = _LATER.get(location.scheme, f"no backend for {location.scheme}://")
        raise ConfigError(
            f"database {location}: {later}; this devtrust stores its data in SQLite: give a "
            "file path or sqlite:///PATH"
        )
    return await opener(location, create=create, read_only=read_only)
