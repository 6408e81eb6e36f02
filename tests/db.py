"""The verifier database from synchronous test code: open its repositories, use them, close
them, in one ``asyncio.run`` (inside an async scenario, use ``verifier.repos`` instead)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from devtrust.verifier.storage import SqliteRepositories, open_sqlite

T = TypeVar("T")


def with_repos(
    path: Path,
    use: Callable[[SqliteRepositories], Awaitable[T]],
    *,
    create: bool = True,
    read_only: bool = False,
) -> T:
    async def main() -> T:
        repos = await open_sqlite(path, create=create, read_only=read_only)
        try:
            return await use(repos)
        finally:
            await repos.close()

    return asyncio.run(main())


def counts(path: Path) -> dict[str, int]:
    """Rows per table of the database at ``path``."""
    return with_repos(path, lambda repos: repos.counts())


def make_database(path: Path) -> None:
    """What `devtrust-verifier serve` makes at its first start (admin commands never make
    it)."""

    async def nothing(repos: SqliteRepositories) -> None:
        return None

    with_repos(path, nothing)
