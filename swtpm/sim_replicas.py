"""The simulator's verifier replicas and the faults that hit them (``devtrust simulate``).

``Replicas`` runs N embedded verifiers (``sim_verifier.EmbeddedVerifier``), separate
``serve`` processes with ports of their own, one CA and server certificate, and one database:
an SQLite file for one replica, a PostgreSQL for several (``--database URL``, or a throwaway
one from ``pgserver`` with ``--postgres``). Each device's agent configuration lists every
replica's address, rotated so that device i starts at replica i mod N: the fleet spreads
over the replicas, and each device moves to the next when its replica goes.

``FleetFaults`` injects the faults that hit the verifiers or their database, and times what
the devices see: a restart of every replica; a kill (SIGKILL) of the replica serving the
most devices, started again ``KILL_DOWN_S`` later as a supervisor would; a drain (SIGTERM,
the verifier's graceful exit) of one, started again once it exited; a restart of the
PostgreSQL under load, after which decisions go on without any verifier restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devtrust.agent.config import VerifierEndpoint
from devtrust.core.errors import DevtrustError
from devtrust.swtpm.pgserver import PgServer
from devtrust.swtpm.sim_faults import FaultKind, Figures
from devtrust.swtpm.sim_fleet import Fleet, SimDevice
from devtrust.swtpm.sim_verifier import EmbeddedVerifier, make_pki

logger = logging.getLogger(__name__)
# A killed replica is started again after this long: systemd's Restart=always with a
# RestartSec of a few seconds, the usual supervisor.
KILL_DOWN_S = 3.0


class Replicas:
    """N verifier processes on one database."""

    def __init__(
        self,
        work: Path,
        *,
        count: int,
        database: str | None,
        database_kind: str,
        simulation_root: Path,
        swtpm_ca: Path | None,
        interval_s: float,
        workers: int = 1,
    ) -> None:
        if count > 1 and database is None:
            raise DevtrustError("replicas need a database they share: a PostgreSQL URL")
        single = count == 1
        pki = make_pki(work / ("verifier" if single else "verifiers") / "pki")
        self.database_kind = database_kind
        self.members = [
            EmbeddedVerifier(
                work / ("verifier" if single else f"verifier-{i}"),
                simulation_root=simulation_root,
                swtpm_ca=swtpm_ca,
                interval_s=interval_s,
                workers=workers,
                database=database,
                pki=pki,
                name="" if single else f"replica {i}",
            )
            for i in range(count)
        ]
        self.database: Path | str = self.members[0].database
        self.exited = 0  # replicas found gone that the run did not stop

    @property
    def ca_bundle(self) -> Path:
        return self.members[0].ca_bundle

    def start(self) -> None:
        """The first alone (it migrates a new database), then the others together."""
        self.members[0].start()
        self._each(EmbeddedVerifier.start, self.members[1:])

    def stop(self) -> None:
        """Every replica at once: each drains, and a fleet told to reconnect elsewhere finds
        no other; they come back after ``start``."""
        self._each(EmbeddedVerifier.stop, self.members)

    @property
    def forced_stops(self) -> int:
        return sum(m.forced_stops for m in self.members)

    @staticmethod
    def _each(
        action: Callable[[EmbeddedVerifier], object], members: list[EmbeddedVerifier]
    ) -> None:
        if not members:
            return
        with ThreadPoolExecutor(len(members)) as pool:
            for done in [pool.submit(action, m) for m in members]:
                done.result()

    def endpoint(self, index: int) -> VerifierEndpoint:
        """Device ``index``'s verifier addresses: every replica's, from replica index mod N."""
        n = len(self.members)
        order = [self.members[(index + k) % n] for k in range(n)]
        if n == 1:
            return VerifierEndpoint(
                enrollment=order[0].enrollment_address,
                attestation=order[0].attestation_address,
                ca_bundle=self.ca_bundle,
            )
        return VerifierEndpoint(
            enrollment=[m.enrollment_address for m in order],
            attestation=[m.attestation_address for m in order],
            ca_bundle=self.ca_bundle,
        )

    def describe(self) -> str:
        return "; ".join(m.describe() for m in self.members)

    def reap(self) -> None:
        """Replicas that exited on their own (a crash): counted, logged and started again,
        as a supervisor would."""
        for member in self.members:
            if member.exited:
                self.exited += 1
                logger.error(
                    "verifier %s exited on its own: %s", member.name or "", member.log_tail()
                )
                member.kill()
                member.start()


class FleetFaults:
    """The faults of the verifiers and their database, injected while the fleet attests;
    the restarts they start run in the background (``wait`` for them)."""

    def __init__(
        self,
        fleet: Fleet,
        replicas: Replicas,
        *,
        postgres: PgServer | None,
        bound_s: float,
    ) -> None:
        self.fleet = fleet
        self.replicas = replicas
        self.postgres = postgres
        self.bound_s = bound_s
        self._tasks: list[asyncio.Task[None]] = []

    def attached(self, member: EmbeddedVerifier | None = None) -> list[SimDevice]:
        """Devices attesting (a result so far, a stream up), to ``member`` when given."""
        out = []
        for device in self.fleet.devices:
            if device.task is None or device.task.done() or device.results == 0:
                continue
            if member is None or self.fleet.address(device) == member.attestation_address:
                out.append(device)
        return out

    def _busiest(self) -> tuple[EmbeddedVerifier, list[SimDevice]]:
        return max(
            ((m, self.attached(m)) for m in self.replicas.members if m.running),
            key=lambda pair: len(pair[1]),
        )

    async def inject(self, kind: FaultKind) -> None:
        # One fault of the verifiers at a time: a replica killed or drained is back before
        # the next (a restart while it starts, or a database restart while it migrates,
        # would be two faults at once).
        await self.wait()
        if kind is FaultKind.RESTART:
            await self._restart()
        elif kind in (FaultKind.KILL, FaultKind.DRAIN):
            await self._move(kind)
        elif kind is FaultKind.PGRESTART:
            await self._database_restart()
        else:
            raise ValueError(f"{kind.value} is not a fault of the verifiers")

    async def _restart(self) -> None:
        connected = self.attached()
        self.fleet.kind(FaultKind.RESTART).injected += len(connected)
        # Down from when the old processes are gone: results they sent while stopping
        # count for the time before the restart, not as a recovery.
        await asyncio.to_thread(self.replicas.stop)
        stopped = time.monotonic()
        for device in connected:
            self.fleet.mark_down(device, FaultKind.RESTART, stopped)
        self.fleet.restarted(stopped)
        await asyncio.to_thread(self.replicas.start)
        for member in self.replicas.members:
            member.restarts += 1

    async def _move(self, kind: FaultKind) -> None:
        """Kill or drain the replica serving the most devices; each of its devices must move
        to another within the bound; the replica comes back in the background."""
        member, devices = self._busiest()
        figures = self.fleet.kind(kind)
        figures.bound_s = self.bound_s
        figures.injected += len(devices)
        if not devices:
            logger.warning("%s: no device attests to %s", kind.value, member.name)
        now = time.monotonic()
        for device in devices:
            self.fleet.mark_moving(device, kind, now, member.attestation_address)
        if kind is FaultKind.KILL:
            await asyncio.to_thread(member.kill)
            down_s = KILL_DOWN_S
        else:
            # SIGTERM, and back once it drained and exited (stop waits for that).
            down_s = 0.0
        self._tasks.append(asyncio.create_task(self._back(member, kind, down_s)))

    async def _back(self, member: EmbeddedVerifier, kind: FaultKind, down_s: float) -> None:
        if kind is FaultKind.DRAIN and not await asyncio.to_thread(member.stop):
            logger.error("%s did not exit within its drain bound of SIGTERM", member.name)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(member.start)
        member.restarts += 1

    async def _database_restart(self) -> None:
        if self.postgres is None:
            raise ValueError("a database restart needs the run's own PostgreSQL (--postgres)")
        connected = self.attached()
        self.fleet.kind(FaultKind.PGRESTART).injected += len(connected)
        now = time.monotonic()
        for device in connected:
            self.fleet.mark_down(device, FaultKind.PGRESTART, now)
        await asyncio.to_thread(self.postgres.restart)

    async def wait(self) -> None:
        """The replicas started again after a kill or drain are up; crashes counted."""
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks.clear()
        self.replicas.reap()


def store_kind(database: str | None, postgres: PgServer | None) -> str:
    """The database as the figures name it."""
    if postgres is not None:
        return f"PostgreSQL (throwaway, 127.0.0.1:{postgres.port})"
    if database is not None:
        return "PostgreSQL (--database)"
    return "SQLite"


def figures_from(figures: Figures, replicas: Replicas) -> None:
    figures.replicas = len(replicas.members)
    figures.database = replicas.database_kind
    figures.verifier = replicas.describe()
