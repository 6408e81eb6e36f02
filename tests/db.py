"""The verifier database from synchronous test code: open its repositories, use them, close
them, in one ``asyncio.run`` (inside an async scenario, use ``verifier.repos`` instead); and
the records and decisions the storage tests store."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.config import database_location
from devtrust.verifier.decision import Decision
from devtrust.verifier.records import DeviceRecord, DeviceState, TpmState
from devtrust.verifier.storage import SqliteRepositories, open_sqlite
from devtrust.verifier.trust import Claim, TrustResult

T = TypeVar("T")
NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
# Claim values whose tier is affirming, warning and contraindicated (draft-ietf-rats-ar4si).
TIER_VALUE = {Tier.AFFIRMING: 2, Tier.WARNING: 33, Tier.CONTRAINDICATED: 99}


def sqlite_file(database: Path | str) -> Path:
    """The SQLite file a test's configured database is (the tests that use this one read or
    open the file itself; a server's URL here is the test's mistake)."""
    location = database if isinstance(database, Path) else database_location(database)
    assert isinstance(location, Path), f"not an SQLite file: {location}"
    return location


def with_repos(
    database: Path | str,
    use: Callable[[SqliteRepositories], Awaitable[T]],
    *,
    create: bool = True,
    read_only: bool = False,
) -> T:
    async def main() -> T:
        repos = await open_sqlite(sqlite_file(database), create=create, read_only=read_only)
        try:
            return await use(repos)
        finally:
            await repos.close()

    return asyncio.run(main())


def counts(database: Path | str) -> dict[str, int]:
    """Rows per table of the database."""
    return with_repos(database, lambda repos: repos.counts())


def make_database(database: Path | str) -> None:
    """What `devtrust-verifier serve` makes at its first start (admin commands never make
    it)."""

    async def nothing(repos: SqliteRepositories) -> None:
        return None

    with_repos(database, nothing)


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


def device_id(n: int) -> DeviceId:
    return DeviceId(f"{n:064x}")


def device(n: int, *, zone: str = "", labels: dict[str, str] | None = None) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id(n),
        state=DeviceState.ENROLLED,
        ek_certificate=b"ek",
        ek_public=b"ekpub",
        ak_public=b"akpub",
        ak_name="00",
        host={"hostname": f"host-{n}"},
        enrolled_at=NOW,
        zone=zone,
        labels=labels or {},
    )


def decision(
    n: int,
    *,
    at: datetime.datetime = NOW,
    tier: Tier = Tier.AFFIRMING,
    staleness: datetime.timedelta = datetime.timedelta(minutes=3),
    tpm: TpmState | None = None,
) -> Decision:
    claims = {} if tier is Tier.NONE else {Claim.INSTANCE_IDENTITY: TIER_VALUE[tier]}
    result = TrustResult(
        device_id=device_id(n),
        claims=claims,
        findings=(),
        appraised_at=at,
        expires_at=at + staleness,
    )
    return Decision(
        device_id=result.device_id,
        zone="",
        result=result,
        previous_tier=None,
        certificate=None,
        withheld="test",
        tpm=tpm,
        rebooted=False,
    )
