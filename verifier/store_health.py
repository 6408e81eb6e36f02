"""Whether the verifier's database answers, told to clients through gRPC health.

A database that stops answering (PostgreSQL restarting, its network gone, an SQLite file
on a failed disk) is an outage, not a bug: the call that met it ends with UNAVAILABLE (the
agent retries, the operator command says "unreachable"), never INTERNAL, and the process
lives on. Health says NOT_SERVING from the first failure until the database answers a
probe again, so that load balancers and agents with several addresses move to a replica
whose database answers; a probe every ``interval_s`` finds an outage nobody's call met, and
the recovery. The backend reconnects by itself (the PostgreSQL pool, the SQLite file): the
verifier needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health, health_pb2

from devtrust.verifier.storage.sql import StoreBusy, StoreUnavailable

logger = logging.getLogger(__name__)

# What callers are told, with UNAVAILABLE, when the database did not answer their call.
OUTAGE_DETAILS = "the verifier's database is unavailable: try again shortly"
# SQLite's OperationalError is an outage only for these primary result codes: busy or
# locked past busy_timeout, out of memory, read-only (the file's permissions), I/O error,
# disk full, cannot open, lock protocol; "no such table" or a syntax error (SQLITE_ERROR)
# is a bug, INTERNAL (review L7). An error without its code is judged by its text.
_SQLITE_OUTAGE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})
_SQLITE_OUTAGE_TEXT = (
    "database is locked",
    "database table is locked",
    "disk i/o error",
    "unable to open",
    "database or disk is full",
    "readonly database",
    "out of memory",
    "locking protocol",
)
# The exception classes, by module and name, of a database that cannot be reached or written
# now: psycopg's and its pool's (connection refused or lost, server shutting down, a
# statement or lock wait past its timeout, no connection within the pool's timeout).
# Matched by name so that this module needs neither driver.
_OUTAGES = {
    ("psycopg", "OperationalError"),
    ("psycopg", "InterfaceError"),
    ("psycopg_pool", "PoolTimeout"),
    ("psycopg_pool", "TooManyRequests"),
}
Probe = Callable[[], Awaitable[object]]


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached or written now (an outage, which
    passes) rather than a mistake in the code or the data (a bug, INTERNAL). The stores' own
    ``StoreUnavailable`` (a server restarting, a commit whose outcome is unknown) is one;
    so is its ``StoreBusy`` for the caller (UNAVAILABLE: try again), though health ignores
    it (``StoreHealth.failed``)."""
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return _sqlite_outage(exc)
    for cls in type(exc).__mro__:
        if (cls.__module__.split(".")[0], cls.__name__) in _OUTAGES:
            return True
    return False


def _sqlite_outage(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _SQLITE_OUTAGE_CODES
    text = str(exc).lower()
    return any(marker in text for marker in _SQLITE_OUTAGE_TEXT)


class StoreHealth:
    """The database's state as health shows it: every name of every health servicer given to
    ``serve`` says SERVING while the database answers, NOT_SERVING while it does not."""

    def __init__(self, probe: Probe, *, interval_s: float, timeout_s: float = 3.0) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._served: list[tuple[health.aio.HealthServicer, tuple[str, ...]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The probe in flight. A probe past its timeout is not cancelled where it blocks (a
        # thread waiting on a dead connection), so no new one starts until it ends: probes
        # every 0.5 s while down would otherwise take every thread and connection of the
        # pool (review M1).
        self._probing: asyncio.Future[object] | None = None
        # Probes started since start (tests).
        self.probes = 0
        self.up = True
        # Outages seen since start (metrics and tests).
        self.outages = 0
        # Writes that lost every run to concurrent writes (StoreBusy), since start.
        self.busy = 0

    def serve(self, servicer: health.aio.HealthServicer, names: list[str]) -> None:
        self._served.append((servicer, tuple(names)))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-health")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._probing is not None:
            self._probing.cancel()  # its thread, if stuck, ends with its connection

    async def failed(self, exc: BaseException) -> None:
        """A call met the outage ``exc``: NOT_SERVING now, and the probe looks again soon.
        A write that lost every run to concurrent writes (``StoreBusy``) is no outage: the
        database answers, and health stays as it is."""
        if isinstance(exc, StoreBusy):
            self.busy += 1
            logger.warning("database busy (%s): the call is told to try again", exc)
            return
        if self.up:
            await self._set(up=False, why=str(exc) or type(exc).__name__)
        self._wake.set()

    async def _set(self, *, up: bool, why: str = "") -> None:
        self.up = up
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if up
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        if up:
            logger.warning("database answers again: health SERVING")
        else:
            self.outages += 1
            logger.error("database unavailable (%s): health NOT_SERVING until it answers", why)
        for servicer, names in self._served:
            for name in names:
                # After enter_graceful_shutdown (a drain) the servicer ignores this.
                await servicer.set(name, status)

    async def check(self) -> bool:
        """Probe the database once; health follows what it says. Whether it answered."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await asyncio.shield(self._next_probe())
        except Exception as exc:  # noqa: BLE001 (any failure of the probe is the database's)
            if self.up:
                await self._set(up=False, why=str(exc) or type(exc).__name__)
            return False
        if not self.up:
            await self._set(up=True)
        return True

    def _next_probe(self) -> asyncio.Future[object]:
        """The probe still in flight, else a new one."""
        if self._probing is None or self._probing.done():
            self.probes += 1
            self._probing = asyncio.ensure_future(self._probe())
            self._probing.add_done_callback(_retrieved)
        return self._probing

    async def _run(self) -> None:
        while True:
            # Sooner while down: health comes back within a fraction of the interval.
            wait = self._interval_s if self.up else min(self._interval_s, 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            await self.check()


def _retrieved(task: asyncio.Future[object]) -> None:
    """A probe's failure, seen by ``check`` or not: not reported as never retrieved."""
    if not task.cancelled():
        task.exception()
