"""What one verifier process must learn from the others sharing its SQLite database (issue 11,
item 3: several worker processes on one host): the change feed, and each device's stream
lease. Tables and triggers of migration 0005.

The feed. Triggers append a row to ``changes`` in the same transaction as the change itself
(a revoked certificate, a revoked or moved device, a device's new tier or score, a newer
stream's lease), so nothing committed is missing from it and nothing rolled back is in it;
seq numbers are assigned by the one writer holding the write lock, so they are committed in
order. Every process reads it by seq (``ChangeFeed``): a dedicated connection checks
``PRAGMA data_version`` (which moves when any other connection commits, a look at shared
memory, no I/O: on the event loop) every ``interval_s``, and only then reads the rows after
the last one it saw, on a thread of its own; the consumers (verifier/revocation.py,
verifier/watch.py) act on them. A consumer that needs the feed up to date at a point (a
decision about to hand out a certificate) calls ``catch_up``. Rows past the newest ``keep``
are pruned by any process (idempotent); a process that finds rows it never read pruned
resyncs (``on_gap``).

The lease. ``SqliteStreams.claim`` gives a device's newest stream, on any process, a token
one above the last; ``check_lease``, run inside the transaction that stores a decision,
refuses (Superseded) a decision from a stream whose token is no longer the device's. The
claim of a newer stream is on the feed too (kind ``lease``): the process holding the older
stream can end it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import sqlite3
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from devtrust.core.ids import DeviceId, Serial
from devtrust.core.tier import Tier
from devtrust.verifier.errors import Superseded
from devtrust.verifier.records import RevokedCertificate
from devtrust.verifier.storage import codec
from devtrust.verifier.storage.sqlite_admin import Database
from devtrust.verifier.storage.sqlite_engine import BUSY_TIMEOUT_MS
from devtrust.verifier.trust import TrustResult

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Kinds of change (migration 0005).
TRUST = "trust"
REVOKED = "revoked"
DEVICE = "device"
LEASE = "lease"
POLICY = "policy"
# How often a process looks whether another committed: what others revoke or change reaches
# it within this (a certificate about to be handed out looks at once: ``catch_up``). Each
# look wakes a thread (about 0.05% of a core here at this rate; 0.25% at 20 a second).
POLL_S = 0.25
# Rows read at once; the rest at the next read, at once.
PAGE = 1000
# Rows kept; older ones are pruned. Every running process reads within a poll (0.25 s), and
# one that starts reads the state itself, so only a process stalled this many changes behind
# needs more (it reloads: on_gap). A trust change's row holds its result (about 2 KB with 8
# GPUs): 20,000 rows stay near 40 MB.
KEEP = 20_000
PRUNE_EVERY_S = 60.0

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


def _when(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def _change(row: sqlite3.Row) -> Change:
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


Handler = Callable[[Sequence[Change]], Awaitable[None]]
GapHandler = Callable[[], Awaitable[None]]


class ChangeFeed:
    """This process's reader of the feed. ``open`` (the position: the newest row now)
    before loading the state the feed then keeps current, ``run`` once the consumers are
    subscribed, ``aclose`` at stop."""

    def __init__(
        self,
        path: Path,
        engine: Database,
        *,
        origin: str,
        interval_s: float = POLL_S,
        keep: int = KEEP,
        prune_every_s: float = PRUNE_EVERY_S,
    ) -> None:
        self._path = path
        self._engine = engine
        self.origin = origin
        self._interval_s = interval_s
        self._keep = keep
        self._prune_every_s = prune_every_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-changes")
        self._db: sqlite3.Connection | None = None
        self._version: int | None = None
        self._seq = 0
        self._handlers: list[Handler] = []
        self._gap_handlers: list[GapHandler] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._moved = asyncio.Event()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def seq(self) -> int:
        """The last row read (and handed to the consumers)."""
        return self._seq

    def subscribe(self, handler: Handler, *, on_gap: GapHandler | None = None) -> None:
        """``handler`` gets every batch of rows read from now on, in seq order; ``on_gap``
        is told when rows were pruned unread (the consumer reloads its state)."""
        self._handlers.append(handler)
        if on_gap is not None:
            self._gap_handlers.append(on_gap)

    async def open(self) -> None:
        self._seq = await self._call(self._open)

    def run(self) -> None:
        """Follow the database from now on: a watcher thread looks at ``data_version``
        every ``interval_s`` (on a connection of its own) and wakes the loop only when it
        moved, so an idle verifier's event loop is not woken for nothing."""
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="change-feed")
            loop = asyncio.get_running_loop()
            self._watcher = threading.Thread(
                target=self._watch, args=(loop,), name="sqlite-changes-watch", daemon=True
            )
            self._watcher.start()

    async def aclose(self) -> None:
        """Stop polling, close the connection; again: nothing."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join)
            self._watcher = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    async def catch_up(self) -> int:
        """Read and hand out every row committed so far; the number of rows. One reader at
        a time, so that consumers get rows once and in order."""
        count = 0
        async with self._lock:
            while True:
                # On the loop, a few microseconds: an idle verifier polls for almost nothing.
                version = self._data_version()
                if version == self._version:
                    return count
                batch, gap = await self._call(self._read)
                if len(batch) < PAGE:
                    self._version = version  # all committed as of ``version`` was read
                if gap:
                    logger.warning(
                        "change feed: rows after %d were pruned unread: reloading", self._seq
                    )
                    for on_gap in self._gap_handlers:
                        await self._safely(on_gap)
                if not batch:
                    return count
                self._seq = batch[-1].seq
                count += len(batch)
                for handler in self._handlers:
                    await self._safely(handler, batch)
                if len(batch) < PAGE:
                    return count

    async def announce(self, kind: str, *, ref: str = "", device_id: str = "") -> None:
        """A row written by this process (origin: this feed's), for what no trigger sees (a
        policy reloaded from its file)."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO changes (kind, device_id, ref, origin) VALUES (?,?,?,?)",
                (kind, device_id, ref, self.origin),
            )

        await self._engine.write(work)

    async def prune(self) -> int:
        """Drop the rows before the newest ``keep``; how many. Idempotent: any process."""

        def work(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?",
                (self._keep,),
            )
            return cur.rowcount

        return await self._engine.write(work)

    # --- the poller ------------------------------------------------------------------------

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        pruned = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), self._prune_every_s)
            self._moved.clear()
            try:
                await self.catch_up()
                if loop.time() - pruned >= self._prune_every_s:
                    pruned = loop.time()
                    await self.prune()
            except Exception:
                logger.exception("change feed: read failed; tried again")
                await asyncio.sleep(1.0)
                self._moved.set()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watcher thread: the loop is told when another connection committed."""
        uri = f"file:{urllib.parse.quote(str(self._path.resolve()))}?mode=ro"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        try:
            last = None
            while not self._stopping.wait(self._interval_s):
                try:
                    version = int(db.execute("PRAGMA data_version").fetchone()[0])
                except sqlite3.Error:
                    logger.exception("change feed: cannot read the database's data version")
                    version = -1
                if version != last:
                    last = version
                    loop.call_soon_threadsafe(self._moved.set)
        except RuntimeError:  # the loop closed first
            return
        finally:
            db.close()

    async def _safely(self, handler: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await handler(*args)
        except Exception:
            logger.exception("change feed: a consumer failed on rows up to %d", self._seq)

    # --- on the feed's thread --------------------------------------------------------------

    async def _call(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    def _open(self) -> int:
        uri = f"file:{urllib.parse.quote(str(self._path.resolve()))}?mode=ro"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db = db
        self._version = int(db.execute("PRAGMA data_version").fetchone()[0])
        row = db.execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def _data_version(self) -> int:
        """Moves whenever another connection commits (a look at shared memory, no I/O).
        Called with the lock held: the feed's thread is not using the connection."""
        if self._db is None:
            raise RuntimeError("ChangeFeed.open was not awaited")
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _read(self) -> tuple[list[Change], bool]:
        """The rows after the last one read, and whether some were pruned unread."""
        db = self._db
        if db is None:
            raise RuntimeError("ChangeFeed.open was not awaited")
        db.execute("BEGIN")
        try:
            rows = db.execute(_READ, (self._seq, PAGE)).fetchall()
            gap = bool(rows) and int(rows[0]["seq"]) > self._seq + 1
            if gap:
                # Seqs are committed in order without holes: a hole is rows pruned unread.
                gap = self._seq > 0 or int(rows[0]["seq"]) > 1
        finally:
            db.execute("COMMIT")
        return [_change(row) for row in rows], gap

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# --- stream leases -----------------------------------------------------------------------


class SqliteStreams:
    """Each device's attestation stream lease (``stream_leases``)."""

    def __init__(self, engine: Database) -> None:
        self._engine = engine

    async def claim(self, device_id: DeviceId, owner: str) -> int:
        """Take the device's lease for a new stream: its token, one above the last one given
        on any process. ``owner`` names the stream for messages (process and stream)."""

        def work(db: sqlite3.Connection) -> int:
            row = db.execute(
                "INSERT INTO stream_leases (device_id, token, owner) VALUES (?, 1, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET token = token + 1, owner = excluded.owner "
                "RETURNING token",
                (device_id, owner),
            ).fetchone()
            return int(row[0])

        return await self._engine.write(work)

    async def holder(self, device_id: DeviceId) -> tuple[int, str] | None:
        """The device's lease now: (token, owner), or None when no stream ever claimed it."""

        def work(db: sqlite3.Connection) -> tuple[int, str] | None:
            return _lease(db, device_id)

        return await self._engine.read(work)


def _lease(db: sqlite3.Connection, device_id: str) -> tuple[int, str] | None:
    row = db.execute(
        "SELECT token, owner FROM stream_leases WHERE device_id = ?", (device_id,)
    ).fetchone()
    return (int(row[0]), str(row[1])) if row is not None else None


def lease_holds(db: sqlite3.Connection, device_id: str, token: int) -> bool:
    """Whether ``token`` is the device's lease now, read in ``db``'s open transaction."""
    lease = _lease(db, device_id)
    return lease is not None and lease[0] == token


def check_lease(db: sqlite3.Connection, device_id: str, token: int | None) -> None:
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
