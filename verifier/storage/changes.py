"""What one verifier process must learn from the others sharing its database (worker
processes on one SQLite file, issue 11; replicas on one PostgreSQL, issue 12): the change
feed, and each device's stream lease. Tables and triggers of migration 0005. This module is
the neutral part, whichever backend: the rows (``Change``, the kinds), what a consumer sees
(``ChangeFeed``, ``StreamLeases``), the lease's SQL; each backend follows the feed its own
way (``sqlite_changes``: PRAGMA data_version; ``pg_feed``: LISTEN/NOTIFY), over the shared
reader in ``feed``.

The feed. Triggers append a row to ``changes`` in the same transaction as the change itself
(a revoked certificate, a revoked or moved device, a device's new tier or score, a newer
stream's lease, a published policy), so nothing committed is missing from it and nothing
rolled back is in it; seq numbers are committed in order (SQLite: the one writer holds the
write lock; PostgreSQL: the trigger takes a transaction lock before it numbers the row). Every
process reads it by seq; the consumers (verifier/revocation.py, verifier/watch.py, the
policy follower in server.py) act on them. A consumer that needs the feed up to date at a
point (a decision about to hand out a certificate) calls ``catch_up``. Rows past the newest
``keep`` are pruned by any process (idempotent); a process that finds rows it never read
pruned resyncs (``on_gap``).

The lease. ``SqlStreams.claim`` gives a device's newest stream, on any process, a token one
above the last; ``check_lease``, run inside the transaction that stores a decision, refuses
(Superseded) a decision from a stream whose token is no longer the device's. The claim of a
newer stream is on the feed too (kind ``lease``): the process holding the older stream can
end it at once.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from devtrust.core.ids import DeviceId, Serial
from devtrust.core.tier import Tier
from devtrust.verifier.errors import Superseded
from devtrust.verifier.records import RevokedCertificate
from devtrust.verifier.storage import codec
from devtrust.verifier.storage.sql import Connection, Engine, Row
from devtrust.verifier.trust import TrustResult

logger = logging.getLogger(__name__)

# Kinds of change (migration 0005).
TRUST = "trust"
REVOKED = "revoked"
DEVICE = "device"
LEASE = "lease"
POLICY = "policy"
# Rows read at once; the rest at the next read, at once.
PAGE = 1000

_READ = (
    "SELECT ch.seq, ch.kind, ch.device_id, ch.ref, ch.previous, ch.zone, ch.origin, "
    "ch.result, d.zone AS device_zone, "
    "c.not_after, c.revoked_at, c.revocation_reason "
    "FROM changes ch "
    "LEFT JOIN devices d ON ch.kind = 'trust' AND d.device_id = ch.device_id "
    "LEFT JOIN certificates c ON ch.kind = 'revoked' AND c.serial = ch.ref "
    "WHERE ch.seq > ? ORDER BY ch.seq LIMIT ?"
)


@dataclass(frozen=True)
class Change:
    """One row of the feed, with what its consumer needs read with it: for ``trust`` the
    result stored (the row's copy) and the device's zone as it is when read, for ``revoked``
    the certificate revoked."""

    seq: int
    kind: str
    device_id: DeviceId
    ref: str
    previous: str = ""
    zone: str = ""
    origin: str = ""
    result: TrustResult | None = None
    revoked: RevokedCertificate | None = None

    @property
    def previous_tier(self) -> Tier | None:
        return codec.tier_from_label(self.previous) if self.kind == TRUST else None

    @property
    def device_revoked(self) -> bool:
        return self.kind == DEVICE and self.ref == "revoked"

    @property
    def moved(self) -> bool:
        return self.kind == DEVICE and self.previous != self.zone


Handler = Callable[[Sequence[Change]], Awaitable[None]]
GapHandler = Callable[[], Awaitable[None]]


class ChangeFeed(Protocol):
    """This process's reader of the feed. ``open`` (the position: the newest row now)
    before loading the state the feed then keeps current, ``run`` once the consumers are
    subscribed, ``aclose`` at stop."""

    origin: str

    @property
    def seq(self) -> int:
        """The last row read (and handed to the consumers)."""
        ...

    def subscribe(self, handler: Handler, *, on_gap: GapHandler | None = None) -> None:
        """``handler`` gets every batch of rows read from now on, in seq order; ``on_gap``
        is told when rows were pruned unread (the consumer reloads its state)."""
        ...

    async def open(self) -> None: ...

    def run(self) -> None:
        """Follow the database from now on (call on the event loop)."""
        ...

    async def aclose(self) -> None:
        """Stop following; again: nothing."""
        ...

    async def catch_up(self) -> int:
        """Read and hand out every row committed so far; the number of rows."""
        ...

    async def announce(self, kind: str, *, ref: str = "", device_id: str = "") -> None:
        """A row written by this process (origin: this feed's), for what no trigger sees."""
        ...

    async def prune(self) -> int:
        """Drop the rows before the newest ``keep``; how many."""
        ...


class StreamLeases(Protocol):
    """Each device's attestation stream lease (``stream_leases``), shared by every process
    on the database."""

    async def claim(self, device_id: DeviceId, owner: str) -> int:
        """Take the device's lease for a new stream: its token, one above the last one given
        on any process. ``owner`` names the stream for messages (process and stream)."""
        ...

    async def holder(self, device_id: DeviceId) -> tuple[int, str] | None:
        """The device's lease now: (token, owner), or None when no stream ever claimed it."""
        ...


# --- reading the feed ----------------------------------------------------------------------


def _when(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def _change(row: Row) -> Change:
    kind, device_id = str(row["kind"]), DeviceId(row["device_id"])
    result = codec.result_from_json(row["result"]) if row["result"] else None
    revoked = None
    if kind == REVOKED and row["revoked_at"] is not None:
        revoked = RevokedCertificate(
            serial=Serial(row["ref"]),
            device_id=device_id,
            not_after=_when(row["not_after"]),
            revoked_at=_when(row["revoked_at"]),
            reason=row["revocation_reason"],
        )
    return Change(
        seq=int(row["seq"]),
        kind=kind,
        device_id=device_id,
        ref=str(row["ref"]),
        previous=str(row["previous"]),
        zone=str(row["device_zone"] if kind == TRUST and row["device_zone"] else row["zone"]),
        origin=str(row["origin"]),
        result=result,
        revoked=revoked,
    )


class Batch(NamedTuple):
    """What one read of the feed found: the rows decoded, whether some were missed (pruned
    unread, or unreadable), the seq of the last row read (decoded or not) and how many."""

    changes: list[Change]
    gap: bool
    last: int
    read: int


def read_after(db: Connection, seq: int) -> Batch:
    """The rows after ``seq`` (at most PAGE), read in ``db``'s open transaction. Prune
    deletes the oldest rows, so rows skipped between ``seq`` and the first row read were
    pruned when no older row is left (a number may also be missing for a transaction that
    rolled back on PostgreSQL: its sequence is not rolled back; that alone is no gap). A row
    that cannot be decoded (a corrupt result or timestamp) is logged and passed over as a
    gap, so that the consumers reload their state from the database instead of the feed
    stopping at it for good (review L4)."""
    rows = db.execute(_READ, (seq, PAGE)).fetchall()
    gap = False
    if rows and int(rows[0]["seq"]) > seq + 1:
        oldest = db.execute("SELECT MIN(seq) FROM changes").fetchone()[0]
        gap = oldest is not None and int(oldest) >= int(rows[0]["seq"])
    changes: list[Change] = []
    for row in rows:
        try:
            changes.append(_change(row))
        except Exception as exc:  # noqa: BLE001 (whatever is wrong with it, go on)
            logger.warning(
                "change feed: row %s (%s) cannot be read (%s): passed over; consumers reload",
                row["seq"],
                str(row["kind"])[:32],
                " ".join(str(exc).split())[:200],
            )
            gap = True
    last = int(rows[-1]["seq"]) if rows else seq
    return Batch(changes, gap, last, len(rows))


def newest(db: Connection) -> int:
    """The newest row's seq (0: none)."""
    return int(db.execute("SELECT MAX(seq) FROM changes").fetchone()[0] or 0)


def insert_change(db: Connection, kind: str, *, device_id: str, ref: str, origin: str) -> None:
    db.execute(
        "INSERT INTO changes (kind, device_id, ref, origin) VALUES (?,?,?,?)",
        (kind, device_id, ref, origin),
    )


def prune_rows(db: Connection, keep: int) -> int:
    cur = db.execute("DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?", (keep,))
    return cur.rowcount


# --- stream leases -----------------------------------------------------------------------


class SqlStreams:
    """``StreamLeases`` over the engine (either backend)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def claim(self, device_id: DeviceId, owner: str) -> int:
        def work(db: Connection) -> int:
            row = db.execute(
                "INSERT INTO stream_leases (device_id, token, owner) VALUES (?, 1, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET token = stream_leases.token + 1, "
                "owner = excluded.owner RETURNING token",
                (device_id, owner),
            ).fetchone()
            return int(row[0])

        return await self._engine.write(work)

    async def holder(self, device_id: DeviceId) -> tuple[int, str] | None:
        def work(db: Connection) -> tuple[int, str] | None:
            return _lease(db, device_id)

        return await self._engine.read(work)


def _lease(db: Connection, device_id: str) -> tuple[int, str] | None:
    row = db.execute(
        "SELECT token, owner FROM stream_leases WHERE device_id = ?", (device_id,)
    ).fetchone()
    return (int(row[0]), str(row[1])) if row is not None else None


def lease_holds(db: Connection, device_id: str, token: int) -> bool:
    """Whether ``token`` is the device's lease now, read in ``db``'s open transaction."""
    lease = _lease(db, device_id)
    return lease is not None and lease[0] == token


def check_lease(db: Connection, device_id: str, token: int | None) -> None:
    """Refuse, inside the transaction that would store it, a decision made on a stream that
    lost its lease (a newer stream of the device, on this process or another, claimed it):
    Superseded, and the transaction stores nothing of it. ``token`` None: a decision made
    without a lease (tests, tools) is not checked."""
    if token is None:
        return
    lease = _lease(db, device_id)
    if lease is None or lease[0] != token:
        held = f"by {lease[1]} (lease {lease[0]})" if lease is not None else "by nobody"
        raise Superseded(
            f"device {device_id}: a newer attestation stream holds its lease ({held}; this "
            f"stream's was {token}): this decision is not stored"
        )
