"""The simulated fleet: devices on one event loop, each the agent's own enrollment and
attestation client over its own mTLS channel, with a TPM (in process, or a swtpm), a
recorded host and identities in memory; faults injected and their detection timed.

A device's evidence is what a real agent sends: ``devtrust.agent.attest.AttestationClient``
builds it, ``devtrust.agent.enroll.enroll`` enrolls it. The simulator sees the TPM's quotes
(``SimTpm``, which also replays an earlier quote for the replay fault) and the results
(the client's ``on_result``), and nothing else of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from devtrust.agent.attest import AttestationClient
from devtrust.agent.config import AgentConfig
from devtrust.agent.enroll import enroll
from devtrust.agent.interfaces import Quote, Selection, Tpm
from devtrust.agent.messages import AttestationResult
from devtrust.agent.state import Enrollment, MemoryFiles
from devtrust.swtpm.sim_faults import FINDINGS, FaultKind, Figures, KindFigures
from devtrust.swtpm.sim_hosts import SimHost
from devtrust.swtpm.soft import SoftTpm

logger = logging.getLogger(__name__)
ENROLL_ATTEMPTS = 5
# Long enough to roll a clock back past any interval; a day, undone when detected.
CLOCK_ROLLBACK_MS = 24 * 3600 * 1000
TAMPERED_PCR = 4  # the boot manager's code


class SimTpm:
    """The ``Tpm`` a device's client uses: its TPM, with every quote timed, and the replay
    fault (the previous quote sent again, with this challenge's fresh claims)."""

    def __init__(self, tpm: Tpm) -> None:
        self.inner = tpm
        self.last: Quote | None = None
        self.replay_next = False
        self.quoted_at: float | None = None
        self.quotes = 0
        self.replayed_at: float | None = None
        # Called at each challenge answered (the fleet times a device's move with it).
        self.on_quote: Callable[[], None] | None = None

    async def ek_certificate(self) -> bytes | None:
        return await self.inner.ek_certificate()

    async def ek_public(self) -> bytes:
        return await self.inner.ek_public()

    async def ak_public(self) -> bytes:
        return await self.inner.ak_public()

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return await self.inner.activate_credential(credential_blob, encrypted_secret)

    async def pcr_read(self, selection: Selection) -> dict[tuple[str, int], bytes]:
        return dict(await self.inner.pcr_read(selection))

    async def quote(self, qualifying_data: bytes, selection: Selection) -> Quote:
        self.quotes += 1
        self.quoted_at = time.monotonic()
        if self.on_quote is not None:
            self.on_quote()
        if self.replay_next and self.last is not None:
            self.replay_next = False
            self.replayed_at = self.quoted_at
            return self.last
        quote = await self.inner.quote(qualifying_data, selection)
        self.last = quote
        return quote


@dataclass
class Pending:
    """A fault injected and not yet seen by the verifier."""

    kind: FaultKind
    at: float
    heal: Callable[[], None]


@dataclass
class SimDevice:
    index: int
    tpm: SimTpm
    soft: SoftTpm | None
    host: SimHost
    files: MemoryFiles = field(default_factory=MemoryFiles)
    enrollment: Enrollment | None = None
    stop: asyncio.Event | None = None
    task: asyncio.Task[None] | None = None
    results: int = 0
    tier: str = "none"
    pending: Pending | None = None
    # A storm or restart: when the device lost its stream, until its next result.
    # Storms and restarts that took the device's stream down: when, until its next result
    # (both at once: a storm may hit a device still coming back from a restart).
    down: dict[FaultKind, float] = field(default_factory=dict)
    # A fault detected and undone: its kind, until a result without its finding.
    recovering: FaultKind | None = None
    # This device's agent configuration (its own order of the replicas' addresses); None:
    # the fleet's.
    cfg: AgentConfig | None = None
    client: AttestationClient | None = None
    # A kill or drain of its replica: (the fault, when, the replica's address), until its
    # first challenge from another replica.
    moving: tuple[FaultKind, float, str] | None = None

    @property
    def name(self) -> str:
        return f"sim-{self.index:05d}"


class Fleet:
    """Every device of a run, and the figures they add up to."""

    def __init__(self, cfg: AgentConfig, ca_pem: bytes, figures: Figures) -> None:
        self.cfg = cfg
        self.ca_pem = ca_pem
        self.figures = figures
        self.devices: list[SimDevice] = []
        self.kinds: dict[str, KindFigures] = figures.kinds
        # Device faults detected: (kind, injected at, seconds to detect).
        self.detections: list[tuple[FaultKind, float, float]] = []
        # Each verifier restart: [when, when its latest device attested again (None: none)].
        self.restarts: list[list[float | None]] = []

    def kind(self, kind: FaultKind) -> KindFigures:
        return self.kinds.setdefault(kind.value, KindFigures())

    def error(self, what: str) -> None:
        self.figures.errors[what] = self.figures.errors.get(what, 0) + 1

    # --- enrollment -------------------------------------------------------------------------

    async def enroll(self, device: SimDevice) -> bool:
        """Enroll ``device``, retrying what a busy verifier refuses; False when it could not."""
        delay = 0.2
        for attempt in range(ENROLL_ATTEMPTS):
            try:
                device.enrollment = await enroll(
                    device.cfg or self.cfg,
                    device.tpm,
                    device.files,
                    host=device.host,
                    ca_pem=self.ca_pem,
                )
            except grpc.aio.AioRpcError as exc:
                if attempt == ENROLL_ATTEMPTS - 1:
                    logger.error(  # noqa: TRY400 - one line per device, no traceback
                        "%s: enrollment failed: %s", device.name, exc.details()
                    )
                    self.error(f"enroll {exc.code().name.lower()}")
                    return False
            except Exception as exc:  # noqa: BLE001 - one device's failure is counted; the fleet goes on
                logger.error("%s: enrollment failed: %s", device.name, exc)  # noqa: TRY400
                self.error(f"enroll {type(exc).__name__}")
                return False
            else:
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return False

    # --- attestation ------------------------------------------------------------------------

    def start(self, device: SimDevice) -> None:
        assert device.enrollment is not None
        device.stop = asyncio.Event()
        device.tpm.on_quote = lambda: self._on_quote(device)
        device.client = client = AttestationClient(
            device.cfg or self.cfg,
            tpm=device.tpm,
            host=device.host,
            files=device.files,
            enrollment=device.enrollment,
            on_result=lambda result: self._on_result(device, result),
        )
        device.task = asyncio.create_task(self._run(device, client, device.stop))

    async def _run(self, device: SimDevice, client: AttestationClient, stop: asyncio.Event) -> None:
        try:
            await client.run(stop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted; the other devices go on
            logger.error("%s: the agent stopped: %s", device.name, exc)  # noqa: TRY400
            self.error(f"agent {type(exc).__name__}")

    async def disconnect(self, device: SimDevice, kind: FaultKind, now: float) -> None:
        """End the device's stream (its client stops) and start it again at once."""
        if device.stop is None or device.task is None:
            return
        device.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await device.task
        device.down.setdefault(kind, now)
        self.start(device)

    def mark_down(self, device: SimDevice, kind: FaultKind, now: float) -> None:
        """The device's stream is going down with the verifier: timed until its next result."""
        device.down.setdefault(kind, now)

    @staticmethod
    def address(device: SimDevice) -> str | None:
        """The verifier address the device's current (or next) stream goes to."""
        # The client's own record of its stream's address; the simulator only reads it.
        target = getattr(device.client, "_target", None)
        address = getattr(target, "address", None)
        return address if isinstance(address, str) else None

    def mark_moving(self, device: SimDevice, kind: FaultKind, now: float, address: str) -> None:
        """The device's replica at ``address`` is going away: timed until its first
        challenge from another replica (its move), then until its next result."""
        if device.moving is None:
            device.moving = (kind, now, address)

    def _on_quote(self, device: SimDevice) -> None:
        if device.moving is None:
            return
        kind, since, left = device.moving
        if self.address(device) == left:
            return  # still (or again) at the replica that went away
        device.moving = None
        self.kind(kind).moves.append(time.monotonic() - since)
        # Survived once this stream's result arrives.
        device.down.setdefault(kind, since)

    def unmoved(self) -> None:
        """At the end: devices that never moved off their replica count against its kind."""
        for device in self.devices:
            if device.moving is not None:
                self.kind(device.moving[0]).unmoved += 1

    def attached(self) -> int:
        """Devices whose attestation client runs (each holds, or is opening, a stream)."""
        return sum(1 for d in self.devices if d.task is not None and not d.task.done())

    async def stop_all(self) -> None:
        for device in self.devices:
            if device.stop is not None:
                device.stop.set()
        tasks = [d.task for d in self.devices if d.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_result(self, device: SimDevice, result: AttestationResult) -> None:
        now = time.monotonic()
        device.results += 1
        self.figures.results += 1
        device.tier = result.trust.tier.label
        # A device's first result carries its whole event log and first policy evaluation
        # (and, early in a run, the policy workers' start): not the steady latency.
        if device.tpm.quoted_at is not None and device.results > 1:
            self.figures.latency_s.append(now - device.tpm.quoted_at)
        for kind, since in device.down.items():
            figures = self.kind(kind)
            figures.detected += 1
            figures.seconds.append(now - since)
            if kind is FaultKind.RESTART and self.restarts:
                self.restarts[-1][1] = now  # the latest device back so far
        device.down.clear()
        ids = {f.id for f in result.trust.findings}
        if device.recovering is not None and FINDINGS[device.recovering] not in ids:
            self.kind(device.recovering).recovered += 1
            device.recovering = None
        pending = device.pending
        if pending is not None and FINDINGS[pending.kind] in ids:
            figures = self.kind(pending.kind)
            figures.detected += 1
            # A replay counts from the quote that was replayed, sent at the next challenge.
            since = pending.at
            if pending.kind is FaultKind.REPLAY and device.tpm.replayed_at is not None:
                since = device.tpm.replayed_at
            figures.seconds.append(now - since)
            self.detections.append((pending.kind, pending.at, now - since))
            device.pending = None
            device.recovering = pending.kind
            pending.heal()

    # --- device faults ----------------------------------------------------------------------

    def inject(self, device: SimDevice, kind: FaultKind, now: float) -> bool:
        """Inject a device fault; False when this device cannot take it (one at a time; PCR
        and clock faults need the in-process TPM)."""
        if device.pending is not None or device.enrollment is None:
            return False
        host, soft = device.host, device.soft
        model = host.model
        heal: Callable[[], None]
        if kind is FaultKind.PCR:
            if soft is None:
                return False
            soft.extend(TAMPERED_PCR, b"devtrust simulate: tampered boot manager", logged=False)
            heal = soft.reboot  # the operator reboots into a clean boot
        elif kind is FaultKind.CLOCK:
            if soft is None:
                return False
            soft.roll_back_clock(CLOCK_ROLLBACK_MS)
            heal = soft.restore_clock
        elif kind is FaultKind.DRIVER:
            host.change(["gpu_driver"], gpu=model.recorded)
            heal = lambda: host.change(["gpu_driver"], gpu=model.gpu)  # noqa: E731
        elif kind is FaultKind.ECC:
            host.change(["gpu_ecc"], gpu=model.ecc)
            heal = lambda: host.change(["gpu_ecc"], gpu=model.gpu)  # noqa: E731
        elif kind is FaultKind.REPLAY:
            if device.tpm.last is None:
                return False
            device.tpm.replay_next = True
            device.tpm.replayed_at = None
            heal = _nothing
        else:
            raise ValueError(f"{kind.value} is not a device fault")
        device.pending = Pending(kind, now, heal)
        self.kind(kind).injected += 1
        return True

    def restarted(self, now: float) -> None:
        self.restarts.append([now, None])

    def split_by_service(self, end: float) -> None:
        """Each device fault's detection time, again for those injected while the verifier
        served: not from a restart until its last device attested again (``end`` for one
        the fleet never wholly recovered from)."""
        windows = [(start, back if back is not None else end) for start, back in self.restarts]
        for kind, at, seconds in self.detections:
            if not any(start is not None and start <= at <= back for start, back in windows):
                self.kind(kind).serving_seconds.append(seconds)

    def missed(self) -> list[tuple[SimDevice, Pending]]:
        return [(d, d.pending) for d in self.devices if d.pending is not None]

    def awaiting(self) -> int:
        """Faults not yet seen or recovered from, and reconnections not yet attesting."""
        return sum(
            1
            for d in self.devices
            if d.pending is not None or d.down or d.recovering is not None or d.moving is not None
        )


def _nothing() -> None:
    return None
