"""Revocation (issue 10, item 3): devices that lose trust lose their certificates, and relying
parties learn of it at once.

Two ways in: an operator revokes a device (``Revoker.revoke``: the device's state REVOKED,
so it neither attests nor enrolls again, and its live certificates revoked), or a device's
tier falls below its zone's minimum (``RevocationSink``, a DecisionSink after the store: its
live certificates revoked, its enrollment kept; the attestor issues none meanwhile, and the
Result names the revoked serials so the agent deletes them).

Two ways out, both updated before a revocation returns: the feed (``subscribe``: every live
revoked serial, an end-of-snapshot marker, then each revocation as it happens; each
subscriber has a bounded queue, and one that falls behind is dropped with
RESOURCE_EXHAUSTED rather than holding memory or holding up the others), and the CRL, signed
by the device issuing CA, signed again at a fixed interval even when nothing changed
(nextUpdate two intervals ahead) and written atomically where configured. A certificate
past its notAfter is expired anyway: it leaves the feed's snapshot and the CRL.

The revoked certificates are kept by storage (``storage.Revocations``); this module holds
the live ones in memory too (loaded at start), so that the feed, the CRL and the serials a
Result carries cost no query. Other processes sharing the database (the verifier's workers,
verifier/workers.py) revoke too: the store's change feed (``follow``) brings their
revocations, and the devices they revoke or move, into this one within its poll interval,
and at once before a decision's certificate is handed out (``RevocationSink``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devtrust.core.files import write_atomic
from devtrust.core.ids import DeviceId, Serial
from devtrust.verifier.decision import Decision, below_minimum
from devtrust.verifier.errors import MalformedInput, NotFound, ResourceExhausted
from devtrust.verifier.logtext import printable
from devtrust.verifier.records import RevokedCertificate
from devtrust.verifier.settings import CertificateSettings, RevocationSettings
from devtrust.verifier.storage.changes import Change, ChangeFeed
from devtrust.verifier.storage.interfaces import Revocations

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are on
    from devtrust.verifier.metrics import VerifierMetrics

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
Sleep = Callable[[float], Awaitable[None]]
MAX_REASON = 1024
# Who revokes automatically, as the audit names actors.
VERIFIER = "verifier"


class CrlSigner(Protocol):
    """Signs the device issuing CA's CRL (``ca.DeviceIssuers``): its CRL numbers only grow."""

    def sign_crl(
        self,
        revoked: list[tuple[int, datetime.datetime]],
        *,
        now: datetime.datetime,
        next_update: datetime.datetime,
    ) -> x509.CertificateRevocationList: ...


@dataclass(frozen=True)
class SignedCrl:
    der: bytes
    this_update: datetime.datetime
    next_update: datetime.datetime
    serials: frozenset[Serial]


@dataclass(frozen=True)
class RevocationEntry:
    """One message of the feed: a revoked certificate (``snapshot``: one that was revoked
    before the subscriber came), or, with ``revoked`` None, the end of the snapshot."""

    revoked: RevokedCertificate | None
    snapshot: bool = False

    @property
    def end_of_snapshot(self) -> bool:
        return self.revoked is None


class _Subscriber:
    """One feed subscriber's queue of live events, bounded: past ``limit`` unread events
    it is dropped (its queue emptied, its next read raises)."""

    def __init__(self, limit: int) -> None:
        self._items: deque[RevocationEntry] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self.dropped = False

    def offer(self, entry: RevocationEntry) -> None:
        if self.dropped:
            return
        if len(self._items) >= self._limit:
            self.dropped = True
            self._items.clear()
        else:
            self._items.append(entry)
        self._ready.set()

    async def next(self) -> RevocationEntry:
        while not self._items:
            if self.dropped:
                raise ResourceExhausted(
                    f"this revocation feed subscriber fell {self._limit} events behind "
                    "(revocation.max_queued_events) and was dropped: read faster, then "
                    "subscribe again for a fresh snapshot"
                )
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class Revoker:
    """The revocations of one verifier: storage, the in-memory live set, the feed, the
    CRL. ``start`` before serving, ``aclose`` at stop; everything runs on the event loop
    (signing and writing the CRL on a worker thread)."""

    def __init__(
        self,
        *,
        revocations: Revocations,
        signer: CrlSigner,
        settings: RevocationSettings,
        clock: Clock,
        metrics: VerifierMetrics | None = None,
    ) -> None:
        self._store = revocations
        # Certificates this verifier revoked, by reason kind (verifier/metrics.py REVOKE_KINDS).
        self._metrics = metrics
        self._signer = signer
        self._settings = settings
        self._clock = clock
        self._live: dict[Serial, RevokedCertificate] = {}
        self._by_device: dict[DeviceId, set[Serial]] = {}
        # Devices an operator revoked while this verifier ran: a decision appraised while
        # the revocation was made issued its certificate after it (RevocationSink).
        self._revoked_devices: set[DeviceId] = set()
        # The zone an operator last moved each device to while this verifier ran: a decision
        # appraised in the old zone while the move was made issued its certificate after
        # the move took the live ones (RevocationSink).
        self._moved: dict[DeviceId, str] = {}
        self._subscribers: set[_Subscriber] = set()
        self._crl: SignedCrl | None = None
        self._signing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._feed: ChangeFeed | None = None

    def follow(self, feed: ChangeFeed) -> None:
        """Learn from ``feed`` what other processes sharing the database revoke: their
        revocations join the live set, the feed's subscribers and the CRL; the devices they
        revoke or move are known to ``device_revoked`` and ``moved_from``. Subscribed before
        ``start`` loads the live set, and the feed opened before that: nothing falls
        between the two (a revocation seen twice is published once)."""
        self._feed = feed
        feed.subscribe(self._on_changes, on_gap=self._reload)

    async def catch_up(self) -> None:
        """Everything other processes committed so far is known here when this returns."""
        if self._feed is not None:
            await self._feed.catch_up()

    async def start(self, *, sleep: Sleep = asyncio.sleep) -> None:
        """Load the live revoked certificates, sign the first CRL, start the refreshes."""
        self._add(await self._store.live(self._clock()))
        await self.refresh()
        self._task = asyncio.create_task(self.maintain(sleep=sleep), name="crl-refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def crl(self) -> SignedCrl:
        if self._crl is None:
            raise RuntimeError("Revoker.start was not awaited: no CRL yet")
        return self._crl

    # --- revoking ----------------------------------------------------------------------------

    async def revoke(
        self, device_id: DeviceId, *, reason: str, actor: str, now: datetime.datetime
    ) -> list[Serial]:
        """An operator's revocation of the device: state REVOKED, its live certificates
        revoked, on the feed and in the CRL when this returns. The serials revoked now
        (none for a device revoked already). NotFound for an unknown device."""
        reason = _checked_reason(reason)
        # Marked before the write: a decision stored once the write has committed finds the
        # mark when it reaches the RevocationSink.
        known = device_id in self._revoked_devices
        self._revoked_devices.add(device_id)
        revoked = await self._store.revoke_device(device_id, reason=reason, actor=actor, now=now)
        if revoked is None:
            if not known:
                self._revoked_devices.discard(device_id)
            raise NotFound(f"no device {device_id}")
        logger.warning(
            "device revoked device=%s by=%s serials=%s reason=%s",
            device_id,
            printable(actor, 128),
            ",".join(c.serial for c in revoked) or "-",
            printable(reason, 256),
        )
        self._count("device_revoked", revoked)
        await self._publish(revoked)
        return [c.serial for c in revoked]

    def _count(self, kind: str, revoked: Sequence[RevokedCertificate]) -> None:
        if self._metrics is not None:
            self._metrics.revoked(kind, len(revoked))

    async def revoke_certificates(
        self,
        device_id: DeviceId,
        *,
        reason: str,
        now: datetime.datetime,
        actor: str = VERIFIER,
        kind: str = "tier_below_minimum",
    ) -> list[Serial]:
        """The device's live certificates revoked (by the verifier: its tier fell; or by
        ``actor``, an operator who moved it), its enrollment kept; published before this
        returns. The serials revoked now. ``kind``: the metrics' reason kind."""
        revoked = await self._store.revoke_certificates(
            device_id, reason=reason, actor=actor, now=now
        )
        await self.stored(device_id, revoked, reason=reason, kind=kind)
        return [c.serial for c in revoked]

    async def stored(
        self,
        device_id: DeviceId,
        revoked: Sequence[RevokedCertificate],
        *,
        reason: str,
        kind: str = "tier_below_minimum",
    ) -> None:
        """Certificates of the device revoked in the store just now (here, or in the
        transaction of a decision whose tier fell: RevocationSink): logged, counted as
        ``kind``, and published before this returns."""
        if revoked:
            self._count(kind, revoked)
            logger.warning(
                "certificates revoked device=%s serials=%s reason=%s",
                device_id,
                ",".join(c.serial for c in revoked),
                printable(reason, 256),
            )
            await self._publish(list(revoked))

    async def zone_changed(
        self, device_id: DeviceId, *, was: str, zone: str, actor: str, now: datetime.datetime
    ) -> list[Serial]:
        """An operator moved the device (its new zone written already): its live
        certificates name the old zone in their claims, and a relying party gating on that
        zone would keep letting it in until they expire, so they are revoked now. It keeps
        its enrollment; its next good attestation gets a certificate naming ``zone``."""
        self._moved[device_id] = zone
        return await self.revoke_certificates(
            device_id,
            reason=zone_change_reason(was, zone),
            now=now,
            actor=actor,
            kind="zone_changed",
        )

    def moved_from(self, device_id: DeviceId, zone: str) -> bool:
        """An operator moved the device out of ``zone`` while this verifier ran."""
        moved = self._moved.get(device_id)
        return moved is not None and moved != zone

    def device_revoked(self, device_id: DeviceId) -> bool:
        """An operator revoked the device while this verifier ran (REVOKED is final)."""
        return device_id in self._revoked_devices

    def revoked_serials(self, device_id: DeviceId) -> tuple[Serial, ...]:
        """The device's revoked certificates not yet expired, oldest first."""
        now = self._clock()
        live = [self._live[s] for s in self._by_device.get(device_id, ())]
        return tuple(c.serial for c in sorted(live, key=_order) if c.not_after > now)

    # --- the feed ----------------------------------------------------------------------------

    async def subscribe(self) -> AsyncGenerator[RevocationEntry, None]:
        """Every live revoked certificate (snapshot), the end-of-snapshot marker, then each
        revocation as it is made. The snapshot and the subscription are taken together (no
        await between them): no revocation falls between the two. ResourceExhausted when
        this subscriber falls ``max_queued_events`` behind."""
        subscriber = _Subscriber(self._settings.max_queued_events)
        now = self._clock()
        snapshot = sorted((c for c in self._live.values() if c.not_after > now), key=_order)
        self._subscribers.add(subscriber)
        try:
            for cert in snapshot:
                yield RevocationEntry(cert, snapshot=True)
            yield RevocationEntry(None, snapshot=True)
            while True:
                yield await subscriber.next()
        finally:
            self._subscribers.discard(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # --- the CRL -----------------------------------------------------------------------------

    async def refresh(self) -> SignedCrl:
        """Sign the CRL again from the live revoked certificates as of now (the expired ones
        leave), and write it to ``crl_path`` where configured. One at a time: each signs
        what is live when its turn comes, so the last one signed is never older."""
        async with self._signing:
            now = self._clock()
            self._prune(now)
            entries = sorted(self._live.values(), key=_order)
            crl = await asyncio.to_thread(self._sign, entries, now)
            self._crl = crl
            path = self._settings.crl_path
            if path is not None:
                try:
                    await asyncio.to_thread(_write_crl, path, crl)
                except OSError as exc:
                    # The feed and GetCrl have it; the file is written again at the next
                    # change or interval.
                    logger.error("cannot write the CRL to %s: %s", path, exc.strerror or exc)  # noqa: TRY400
            return crl

    async def maintain(self, *, sleep: Sleep = asyncio.sleep) -> None:
        """Sign the CRL again each ``crl_interval`` after the last one, for ever."""
        interval = self._settings.crl_interval
        while True:
            due = self.crl.this_update + interval
            await sleep(max(0.0, (due - self._clock()).total_seconds()))
            if self._clock() < due:
                continue
            try:
                await self.refresh()
            except Exception:
                logger.exception("CRL refresh failed; the last CRL stays, tried again later")
                await sleep(interval.total_seconds())

    def _sign(self, entries: list[RevokedCertificate], now: datetime.datetime) -> SignedCrl:
        next_update = now + 2 * self._settings.crl_interval
        crl = self._signer.sign_crl(
            [(int(c.serial, 16), c.revoked_at) for c in entries], now=now, next_update=next_update
        )
        return SignedCrl(
            der=crl.public_bytes(serialization.Encoding.DER),
            this_update=now,
            next_update=next_update,
            serials=frozenset(c.serial for c in entries),
        )

    # --- the live set ------------------------------------------------------------------------

    async def _publish(self, revoked: list[RevokedCertificate]) -> None:
        """Revocations just stored: into the live set, to every subscriber (once: the change
        feed may have brought them first), into the CRL."""
        self._offer(revoked)
        await self.refresh()

    def _offer(self, revoked: Iterable[RevokedCertificate]) -> int:
        """The revocations not in the live set yet: added, and to every subscriber. No await
        between the check and the add: the change feed and ``revoke`` never offer one twice."""
        fresh = [cert for cert in revoked if cert.serial not in self._live]
        self._add(fresh)
        for cert in fresh:
            entry = RevocationEntry(cert)
            for subscriber in self._subscribers:
                subscriber.offer(entry)
        return len(fresh)

    async def _on_changes(self, changes: Sequence[Change]) -> None:
        """Rows of the change feed: what any process revoked or moved."""
        now = self._clock()
        revoked: list[RevokedCertificate] = []
        for change in changes:
            if change.device_revoked:
                self._revoked_devices.add(change.device_id)
            if change.moved:
                self._moved[change.device_id] = change.zone
            if change.revoked is not None and change.revoked.not_after > now:
                revoked.append(change.revoked)
        if self._offer(revoked):
            await self.refresh()

    async def _reload(self) -> None:
        """The feed lost rows unread: the live set read again from storage."""
        if self._offer(await self._store.live(self._clock())):
            await self.refresh()

    def _add(self, revoked: Iterable[RevokedCertificate]) -> None:
        for cert in revoked:
            self._live[cert.serial] = cert
            self._by_device.setdefault(cert.device_id, set()).add(cert.serial)

    def _prune(self, now: datetime.datetime) -> None:
        for serial in [s for s, c in self._live.items() if c.not_after <= now]:
            cert = self._live.pop(serial)
            serials = self._by_device.get(cert.device_id)
            if serials is not None:
                serials.discard(serial)
                if not serials:
                    del self._by_device[cert.device_id]


class RevocationSink:
    """A DecisionSink, after the store: a decision whose tier does not meet the device's
    zone minimum revokes the device's live certificates (its enrollment stays, and it gets
    certificates again once its tier does). Every decision leaves with the device's revoked
    serials still unexpired, for the Result."""

    def __init__(self, revoker: Revoker, certificates: CertificateSettings) -> None:
        self._revoker = revoker
        self._certificates = certificates

    def _superseded(self, decision: Decision) -> tuple[str, str] | None:
        """Why the certificate this decision issued is void already (reason, why withheld),
        or None."""
        if decision.certificate is None:
            return None
        if self._revoker.device_revoked(decision.device_id):
            return (
                "the device was revoked while this certificate was issued",
                "the device is revoked",
            )
        if self._revoker.moved_from(decision.device_id, decision.zone):
            return (
                f"issued for zone {decision.zone or '(unassigned)'} while the device was moved",
                "the device was moved to another zone meanwhile",
            )
        return None

    async def publish(self, decision: Decision) -> Decision | None:
        if decision.certificate is not None:
            # Stored already (the store sink is first): what another process revoked or
            # moved before it was stored is known here now (verifier/workers.py).
            await self._revoker.catch_up()
        tier, zone = decision.result.tier, decision.zone
        minimum = self._certificates.min_tier_for(zone)
        superseded = self._superseded(decision)
        if superseded is not None:
            # The attestor read the device before an operator revoked or moved it, and the
            # certificate it issued (for a device no longer trusted, or naming the old zone)
            # was stored after that change took the live ones: revoked here, never handed out.
            reason, withheld = superseded
            await self._revoker.revoke_certificates(
                decision.device_id, reason=reason, now=decision.at, kind="superseded"
            )
            decision = replace(
                decision, certificate=None, withheld=f"withheld: {withheld}", trust_bundle=()
            )
        elif decision.revoked_now is not None:
            # The store revoked the live certificates in the decision's own transaction (its
            # tier fell below the zone's minimum): published here, no read of the store.
            await self._revoker.stored(
                decision.device_id, decision.revoked_now, reason=decision.revoke_reason
            )
        elif not tier.meets(minimum):
            await self._revoker.revoke_certificates(
                decision.device_id, reason=below_minimum(tier, minimum, zone), now=decision.at
            )
        serials = self._revoker.revoked_serials(decision.device_id)
        return replace(decision, revoked_serials=serials) if serials else None


def zone_change_reason(was: str, zone: str) -> str:
    """The reason a zone change revokes with, on the feed, in the CRL's store and audit."""
    return f"zone changed from {was or '(unassigned)'} to {zone or '(unassigned)'}"


def _order(cert: RevokedCertificate) -> tuple[datetime.datetime, str]:
    return cert.revoked_at, cert.serial


def _checked_reason(reason: str) -> str:
    text = reason.strip()
    if not text:
        raise MalformedInput("a revocation needs a reason (--reason): it is audited and published")
    if len(text) > MAX_REASON:
        raise MalformedInput(f"a revocation reason is at most {MAX_REASON} characters")
    return text


def _write_crl(path: Path, crl: SignedCrl) -> None:
    """PEM, as openssl (-CRLfile) and TLS servers read CRL files."""
    loaded = x509.load_der_x509_crl(crl.der)
    write_atomic(path, loaded.public_bytes(serialization.Encoding.PEM), mode=0o644)
