"""Which backend a configured database names, and opening it: the one place that knows the
backends. A file (a path, or sqlite:///PATH) is SQLite; a server's URL goes to the backend of
its scheme. A backend is a module of its own (``sqlite``, ``postgresql``) plus its line in
``_SERVERS``; callers never name one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import DatabaseUrl, database_location
from devtrust.verifier.storage.interfaces import Repositories
from devtrust.verifier.storage.postgresql import open_postgresql
from devtrust.verifier.storage.sqlite import open_sqlite

# scheme -> open(url, create=, read_only=).
OpenServer = Callable[..., Awaitable[Repositories]]
_SERVERS: dict[str, OpenServer] = {
    "postgresql": open_postgresql,
    "postgres": open_postgresql,
}


async def open_repositories(
    database: Path | str, *, create: bool = True, read_only: bool = False
) -> Repositories:
    """The verifier's repositories over ``database``: a Path is an SQLite file; a string is
    read as `database:` is (a path relative to the working directory, sqlite:///PATH, or a
    server's URL). ``create`` False: a database that does not exist is an error, never
    made; ``read_only``: nothing is migrated nor written. ConfigError for a database this
    devtrust cannot use, naming the forms it can."""
    if isinstance(database, Path | DatabaseUrl):
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
        raise ConfigError(
            f"database {location}: no backend for {location.scheme}://: give a file path, "
            "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
        )
    return await opener(location, create=create, read_only=read_only)
