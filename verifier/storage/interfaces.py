"""The verifier's storage, as asynchronous repository interfaces: what the services call,
whatever database is behind them (SQLite, or PostgreSQL shared by replicas: ``backends``
picks one by the configured database).

Every method is a coroutine and none reads the clock: callers pass ``now``. Each write is
atomic (all of it or nothing) and durable when its await returns. Device ids arrive as
``DeviceId``, parsed once where they enter (the wire, the peer's certificate, the inventory):
a backend never sees text that is not one.
"""

from __future__ import annotations

import builtins
import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.decision import Decision
from devtrust.verifier.records import (
    AuditEntry,
    AuditEvent,
    BootstrapToken,
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    PendingEnrollment,
    RevokedCertificate,
    Standing,
    TpmState,
)
from devtrust.verifier.storage.changes import ChangeFeed, StreamLeases
from devtrust.verifier.trust import TrustResult

MAX_PAGE = 1000


@dataclass(frozen=True)
class DeviceQuery:
    """Which devices, one page of them in device-id order; every filter is done by the
    database. Filters combine (all must hold)."""

    zone: str = ""  # "" = every zone
    # The device's latest result has this tier; a device never appraised counts as tier
    # none. With ``now``, read as ``TrustResult.at(now)``: a result past its expires_at
    # counts as tier none (what the Query service shows).
    tier: Tier | None = None
    label: tuple[str, str] | None = None  # (key, value): the device carries this label
    # last_seen older than this (or never seen).
    stale_before: datetime.datetime | None = None
    after: str = ""  # the last device id of the previous page
    limit: int = 100
    # Additions: more labels, all required; the time tiers are read at (see ``tier``); and
    # staleness by the result's own bound: no result, or its expires_at <= stale_at
    # (ListDevices' stale_only is stale_at=now).
    labels: tuple[tuple[str, str], ...] = ()
    now: datetime.datetime | None = None
    stale_at: datetime.datetime | None = None

    def __post_init__(self) -> None:
        if not 0 < self.limit <= MAX_PAGE:
            raise ValueError(f"DeviceQuery.limit {self.limit}: give 1 to {MAX_PAGE}")

    @property
    def all_labels(self) -> tuple[tuple[str, str], ...]:
        return ((self.label,) if self.label else ()) + self.labels


@dataclass(frozen=True)
class DeviceView:
    """A device with its latest trust result (None: never appraised), as one page lists
    them."""

    record: DeviceRecord
    result: TrustResult | None


@dataclass(frozen=True)
class FleetCount:
    """How many devices of one zone, state and tier the database holds (``fleet_counts``)."""

    zone: str
    state: str
    # The tier of the device's latest result read at the time asked for: none when never
    # appraised or past its expires_at (TrustResult.at(now), as the Query service shows it).
    tier: str
    devices: int


# What an answered enrollment makes of the device: from the device as the database holds it
# (None: new) and the enrollment's bootstrap token as it stands (None: none or unknown).
DecideEnrollment = Callable[[DeviceRecord | None, BootstrapToken | None], DeviceRecord]


class Devices(Protocol):
    async def get(self, device_id: DeviceId) -> DeviceRecord | None: ...

    async def list(self, query: DeviceQuery) -> list[DeviceRecord]: ...

    async def list_with_trust(self, query: DeviceQuery) -> builtins.list[DeviceView]:
        """Like ``list``, each device with its latest result, in one query."""
        ...

    async def fleet_counts(self, now: datetime.datetime) -> builtins.list[FleetCount]:
        """The devices counted by zone, state and tier at ``now``, in one grouped query (the
        metrics' devices gauge, verifier/metrics.py)."""
        ...

    async def save(self, rec: DeviceRecord, *, now: datetime.datetime, event: str) -> bool:
        """Insert or replace the device (its last_seen is kept), audited as ``event``; False
        (nothing written) when the database holds the device revoked: a revocation is
        undone by no save, whatever the caller read before."""
        ...

    async def activate(
        self,
        enrollment_id: str,
        *,
        device_id: DeviceId,
        token_sha256: str,
        decide: DecideEnrollment,
        certificate: CertificateRecord | None,
        now: datetime.datetime,
    ) -> DeviceRecord:
        """An answered enrollment, all in one transaction (review H3: a revocation committed
        between a check and a later save could otherwise be undone): the challenge taken
        (NotFound when another answer took it), the device read (Rejected when revoked),
        ``decide(existing, token)`` giving the record to save, the bootstrap token spent
        (Rejected when spent meanwhile), the device saved (audited "enrolled:<state>"), and
        ``certificate``, signed beforehand, recorded when the record is ENROLLED. On any
        refusal nothing is written. ``decide`` is pure: it may run again when the
        transaction does."""
        ...

    async def set_state(
        self, device_id: DeviceId, state: DeviceState, *, now: datetime.datetime, event: str
    ) -> bool:
        """False when there is no such device."""
        ...

    async def set_assignment(
        self,
        device_id: DeviceId,
        *,
        zone: str,
        labels: dict[str, str],
        now: datetime.datetime,
        event: str,
    ) -> bool:
        """An operator's change of zone and labels, audited with the old ones; False when
        there is no such device."""
        ...


class Enrollments(Protocol):
    async def put(
        self,
        pending: PendingEnrollment,
        *,
        now: datetime.datetime,
        max_per_device: int,
        max_total: int,
    ) -> None:
        """Store a challenge; expired ones are purged first. ResourceExhausted (nothing
        changed) past ``max_per_device`` waiting for the device or ``max_total`` in all. A
        waiting challenge is never dropped for a newer one: Enroll asks for nothing secret,
        so dropping would let anyone void a device's enrollment."""
        ...

    async def get(self, enrollment_id: str) -> PendingEnrollment | None: ...

    async def take(self, enrollment_id: str) -> bool:
        """Delete it once its proof checked out; False when another answer took it first
        (a challenge is answered at most once)."""
        ...


class Tokens(Protocol):
    async def add(
        self,
        token_sha256: str,
        *,
        now: datetime.datetime,
        expires_at: datetime.datetime,
        note: str = "",
        zone: str = "",
        labels: dict[str, str] | None = None,
    ) -> None:
        """A one-time bootstrap token (stored hashed); ``zone`` and ``labels`` are what it
        assigns to the device that first enrolls with it."""
        ...

    async def get(self, token_sha256: str) -> BootstrapToken | None: ...

    async def use(self, token_sha256: str, *, device_id: DeviceId, now: datetime.datetime) -> bool:
        """Spend it; False when another device spent it (or it expired) meanwhile. The
        device that spent it may present it again (a retry while pending approval)."""
        ...


class TrustRepository(Protocol):
    async def record(self, decision: Decision) -> Sequence[RevokedCertificate]:
        """The decision's trust row, the device's last_seen, its audit entry, its TPM state
        and event-log part and its certificate, atomically; returns once committed. The
        trust row, last_seen and the TPM state only move forward in time: a replaced
        stream's late decision changes none of them (its audit entry is kept). With a
        ``revoke_reason``, the device's live certificates are revoked in the same
        transaction: those revoked."""
        ...

    async def latest(self, device_id: DeviceId) -> TrustResult | None: ...

    async def tpm_state(self, device_id: DeviceId, *, with_log: bool = True) -> TpmState | None:
        """What the verifier knows of the device's TPM, its event log replayed from the
        stored parts, or (``with_log=False``) without the log: a new stream asks for the
        whole log anyway."""
        ...

    async def event_log(self, device_id: DeviceId) -> bytes:
        """The device's stored event log since its last reboot."""
        ...


class Certificates(Protocol):
    async def record(self, cert: CertificateRecord) -> None: ...


class Revocations(Protocol):
    """Device certificates revoked before they expire (verifier/revocation.py publishes
    them). "Live": not expired at ``now``; only device certificates are revoked here (the
    device issuing CA's CRL lists nothing else)."""

    async def revoke_device(
        self, device_id: DeviceId, *, reason: str, actor: str, now: datetime.datetime
    ) -> builtins.list[RevokedCertificate] | None:
        """An operator's revocation, atomically: the device's state REVOKED (it neither
        attests nor enrolls again), its live certificates revoked, one audit entry. The
        certificates revoked now (none when it was revoked already); None: no such device."""
        ...

    async def revoke_certificates(
        self, device_id: DeviceId, *, reason: str, actor: str, now: datetime.datetime
    ) -> builtins.list[RevokedCertificate]:
        """The device's live certificates not yet revoked, revoked now and audited (its
        enrollment stays); those revoked now."""
        ...

    async def live(self, now: datetime.datetime) -> builtins.list[RevokedCertificate]:
        """Every revoked certificate not expired at ``now``."""
        ...

    async def live_certificates(
        self, device_id: DeviceId, now: datetime.datetime
    ) -> builtins.list[CertificateRecord]:
        """The device's certificates not expired at ``now`` and not revoked."""
        ...


class Roles(Protocol):
    """Operator roles recorded in the database (verifier/roles.py; the configuration's
    ``operators:`` wins over them, verifier/authz.py). Read at every operator call: a role
    taken away is refused at the next call."""

    async def get(self, name: str) -> str | None:
        """The role's label recorded for operator ``name``, or None."""
        ...

    async def set(
        self, name: str, role: str | None, *, now: datetime.datetime, actor: str
    ) -> str | None:
        """Record ``role`` for ``name`` (None takes the role away); the role it had."""
        ...

    async def all(self) -> dict[str, str]:
        """Every recorded name and its role's label."""
        ...


@dataclass(frozen=True)
class HistoryItem:
    """One entry of a device's audit trail, an appraisal's result decoded (None for other
    events)."""

    entry: AuditEntry
    result: TrustResult | None


class Operations(Protocol):
    """Operators' changes to devices, each audited with its actor, and the audit trail in
    pages (the Query service's Approve, SetZone, History)."""

    async def apply(
        self,
        device_id: DeviceId,
        *,
        before: Standing,
        after: Standing,
        events: Sequence[AuditEvent],
        actor: str,
        now: datetime.datetime,
    ) -> bool:
        """Move the device from ``before`` to ``after`` and write ``events`` naming
        ``actor``, atomically; False (nothing written) when the device is not at ``before``
        any more (changed meanwhile, or gone): the caller reads it again."""
        ...

    async def history(
        self, device_id: DeviceId, *, before_seq: int | None, limit: int
    ) -> builtins.list[HistoryItem]:
        """The device's audit entries older than ``before_seq`` (None: from the latest),
        newest first, at most ``limit``."""
        ...


class Audit(Protocol):
    async def history(self, device_id: DeviceId, *, limit: int = 100) -> list[AuditEntry]:
        """The device's latest ``limit`` audit entries, newest first."""
        ...


@dataclass(frozen=True)
class StoredPolicy:
    """The policy as the database keeps it for every replica: its id, its digest (hex
    sha256 of its text and data, as the verifier computes it) and its documents (file name ->
    text: every file it was loaded from, so another replica loads the identical policy
    without files of its own)."""

    policy_id: str
    digest: str
    documents: dict[str, str]
    published_at: datetime.datetime


class Policies(Protocol):
    async def publish(
        self, policy: StoredPolicy, *, actor: str, origin: str, now: datetime.datetime
    ) -> None:
        """Store ``policy`` as the current one, with a ``policy`` row on the change feed
        (``origin``: this process, so it does not reload its own) and an audit entry
        "policy_changed", atomically."""
        ...

    async def current(self) -> StoredPolicy | None:
        """The policy published last; None: none ever was."""
        ...


class Repositories(Protocol):
    """What the verifier holds, one per process; closed at stop."""

    @property
    def location(self) -> str:
        """Where the data is (a file, a server), for messages."""
        ...

    @property
    def devices(self) -> Devices: ...
    @property
    def enrollments(self) -> Enrollments: ...
    @property
    def tokens(self) -> Tokens: ...
    @property
    def trust(self) -> TrustRepository: ...
    @property
    def certificates(self) -> Certificates: ...
    @property
    def audit(self) -> Audit: ...
    @property
    def revocations(self) -> Revocations: ...
    @property
    def roles(self) -> Roles: ...
    @property
    def operations(self) -> Operations: ...

    def policies(self) -> Policies: ...

    def streams(self) -> StreamLeases:
        """Each device's stream lease, shared by every process on the database."""
        ...

    def change_feed(self, origin: str) -> ChangeFeed:
        """A reader of what the processes sharing the database change (``origin`` names
        this process on the rows it writes); the caller opens, runs and closes it."""
        ...

    async def counts(self) -> dict[str, int]:
        """Rows per table (tests check that refused input wrote nothing)."""
        ...

    async def close(self) -> None:
        """Let the writes in flight commit, then release the database."""
        ...
