"""Follow the verifier's revocation feed (``devtrust.v1.Revocations/WatchRevocations``) and
keep the set of revoked device certificate serials for the gate.

The stream sends every live revoked serial first (``snapshot``), then ``end_of_snapshot``,
then each revocation as it happens. A serial once revoked stays in the set until its
certificate's notAfter (an expired certificate fails the gate anyway); a reconnection's
snapshot is added to what is known, never replaces it. The follower reconnects with backoff
when the stream breaks, and says when it cannot be relied on (``RevocationList.feed_problem``,
which makes every decision deny): before its first complete snapshot, and once it has been
without a stream for longer than ``max_gap``. A shorter gap is tolerated, at the cost of at
most that much delay in seeing a revocation.

Only this module of the gate imports protobuf (the generated ``devtrust.v1``): a relying party
that gates on CRLs, or on nothing but certificate lifetimes, needs only cryptography and grpc.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from devtrust.gate.decision import RevocationList
from devtrust.v1 import query_pb2, query_pb2_grpc

logger = logging.getLogger(__name__)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class FeedEntry:
    """One message of the feed, converted where it enters (STYLE 4): a revoked serial with
    the time it stops mattering, or the end of the snapshot (``serial`` None)."""

    serial: int | None
    not_after: datetime.datetime | None
    end_of_snapshot: bool


def entry_from_wire(event: query_pb2.RevocationEvent) -> FeedEntry:
    """``ValueError`` for a serial that is not hex: the feed is then not trusted to be read
    right, and the stream is dropped (and the follower goes stale) rather than skipping it."""
    if event.end_of_snapshot:
        return FeedEntry(serial=None, not_after=None, end_of_snapshot=True)
    try:
        serial = int(event.serial_hex, 16)
    except ValueError:
        raise ValueError(f"revocation feed: serial {event.serial_hex[:80]!r} is not hex") from None
    not_after = event.not_after.ToDatetime(datetime.UTC) if event.HasField("not_after") else None
    return FeedEntry(serial=serial, not_after=not_after, end_of_snapshot=False)


@dataclass(frozen=True)
class Backoff:
    """Seconds between reconnections: ``initial``, doubling to ``maximum``, each with up
    to ``jitter`` of itself added at random (so that relying parties do not reconnect in
    step after a verifier restart)."""

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.2

    def delay(self, failures: int) -> float:
        base = min(self.maximum, self.initial * 2.0 ** max(0, failures - 1))
        return base * (1 + self.jitter * random.random())  # noqa: S311 (spread, not secrecy)


class RevocationFollower:
    """``run()`` follows the feed until cancelled; ``revocations(now)`` is the gate's
    source (``Gate(revocations=follower.revocations)``), callable from any thread.

    ``connect`` makes the channel to the verifier (mTLS with a relying-party or operator
    certificate); a new one per connection. ``stream_timeout``: each stream's deadline
    (STYLE 15), after which it is opened again at once."""

    def __init__(
        self,
        connect: Callable[[], grpc.aio.Channel],
        *,
        max_gap: datetime.timedelta = datetime.timedelta(seconds=60),
        backoff: Backoff = Backoff(),  # frozen: one shared default is safe
        stream_timeout: float = 3600.0,
        clock: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self._connect = connect
        self._max_gap = max_gap
        self._backoff = backoff
        self._stream_timeout = stream_timeout
        self._clock = clock
        self._expiry: dict[int, datetime.datetime | None] = {}
        self._serials: frozenset[int] = frozenset()  # replaced whole: read from any thread
        self._in_sync = False  # a stream is open and its snapshot complete
        self._ever_synced = False
        self._lost_at: datetime.datetime | None = None
        self._last_error = ""
        self.connections = 0  # streams opened, for tests and metrics
        self.synced = asyncio.Event()  # set at each complete snapshot

    @property
    def in_sync(self) -> bool:
        """A stream is open and its snapshot complete."""
        return self._in_sync

    def revocations(self, now: datetime.datetime) -> RevocationList:
        serials = self._serials
        if not self._ever_synced:
            return RevocationList(
                serials=serials,
                feed_problem=f"no complete snapshot from the revocation feed yet{self._why()}",
            )
        lost_at = self._lost_at
        if not self._in_sync and lost_at is not None and now - lost_at > self._max_gap:
            return RevocationList(
                serials=serials,
                feed_problem=(
                    f"disconnected since {lost_at.isoformat()}, more than "
                    f"{self._max_gap.total_seconds():g} s{self._why()}"
                ),
            )
        return RevocationList(serials=serials)

    def _why(self) -> str:
        return f" ({self._last_error})" if self._last_error else ""

    def apply(self, entry: FeedEntry) -> None:
        """One entry of the feed into the state (pure of I/O; the stream's loop calls it)."""
        if entry.end_of_snapshot:
            self._in_sync = self._ever_synced = True
            self._lost_at = None
            self._last_error = ""
            self.synced.set()
            return
        assert entry.serial is not None
        now = self._clock()
        self._expiry[entry.serial] = entry.not_after
        for serial, not_after in list(self._expiry.items()):
            if not_after is not None and not_after < now:
                del self._expiry[serial]
        self._serials = frozenset(self._expiry)

    def _lost(self, why: str) -> None:
        if self._in_sync or self._lost_at is None:
            self._lost_at = self._clock()
        self._in_sync = False
        self._last_error = why
        self.synced.clear()

    async def _follow_once(self) -> None:
        """One stream, to its end."""
        channel = self._connect()
        try:
            stub = query_pb2_grpc.RevocationsStub(channel)
            call = stub.WatchRevocations(
                query_pb2.WatchRevocationsRequest(), timeout=self._stream_timeout
            )
            self.connections += 1
            async for event in call:
                self.apply(entry_from_wire(event))
        finally:
            await channel.close()

    async def run(self) -> None:
        """Follow the feed until cancelled, reconnecting with backoff."""
        failures = 0
        while True:
            try:
                await self._follow_once()
                why = "the feed ended its stream"
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and self._in_sync:
                    self._lost(why)
                    failures = 0
                    continue  # the stream's own deadline: open the next one at once
            except ValueError as exc:
                why = str(exc)
            failures = 1 if self._in_sync else failures + 1
            self._lost(why)
            delay = self._backoff.delay(failures)
            logger.warning("revocation feed: %s; reconnecting in %.1f s", why, delay)
            await asyncio.sleep(delay)
