"""Appraisal decisions stored per second: SQLite (one writer, group commit) against
PostgreSQL (a pool, one SERIALIZABLE transaction per decision), the same repository code.
A PostgreSQL server is started from the machine's binaries (tests/pg.py) with fsync on.

    nice .venv/bin/python -m bench.store_writes [--devices 500] [--rounds 4] [--concurrency 64]

Each round stores one decision per device (a new appraisal time, the tier unchanged: the
steady state, no change-feed rows), ``concurrency`` at a time, as streams of many devices do.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from devtrust.verifier.storage import Repositories, open_repositories
from devtrust.verifier.storage.postgresql import PgRepositories
from tests.db import NOW, decision, device
from tests.pg import PgServer


async def _measure(repos: Repositories, devices: int, rounds: int, concurrency: int) -> float:
    leases = {}
    for n in range(devices):
        await repos.devices.save(device(n), now=NOW, event="enrolled:enrolled")
        leases[n] = await repos.streams().claim(device(n).device_id, f"stream-{n}")
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int, r: int) -> None:
        # As the attestation service stores them: under the stream's lease, the device's
        # standing checked in the same transaction.
        made = replace(
            decision(n, at=NOW + datetime.timedelta(seconds=r + 1)),
            lease=leases[n],
            assumed=device(n),
        )
        async with gate:
            await repos.trust.record(made)

    await asyncio.gather(*(one(n, 0) for n in range(devices)))  # warm: rows exist
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        await asyncio.gather(*(one(n, r) for n in range(devices)))
    return devices * rounds / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = await open_repositories(Path(tmp) / "v.db")
        try:
            rate = await _measure(sqlite, args.devices, args.rounds, args.concurrency)
            print(f"sqlite      {rate:8.0f} decisions/s")
        finally:
            await sqlite.close()
    server = await asyncio.to_thread(lambda: PgServer(fsync=True).start())
    try:
        name = await asyncio.to_thread(server.create_database)
        pg = await open_repositories(f"{server.url(name)}?pool_size={args.pool_size}")
        assert isinstance(pg, PgRepositories)
        try:
            rate = await _measure(pg, args.devices, args.rounds, args.concurrency)
            conflicts = pg.engine.conflicts
            print(
                f"postgresql  {rate:8.0f} decisions/s (pool_size {args.pool_size}; "
                f"{conflicts} serialization conflicts run again)"
            )
        finally:
            await pg.close()
    finally:
        await asyncio.to_thread(server.close)


if __name__ == "__main__":
    asyncio.run(main())
