"""The trust watch: a decision sink that hands each stored result that changes a device's
tier or score to the operators watching (the Query service's WatchTrust).

It must never hold up attestation (verifier/decision.py: ``publish`` is awaited before the
agent gets its Result). So each watcher has a bounded queue, ``publish`` only puts into
queues without waiting, and a watcher that falls a whole queue behind is dropped: its stream
ends with RESOURCE_EXHAUSTED saying so, and it reconnects with ``initial`` to read the
current results again. A slow reader costs its own stream, never a device's appraisal.

"Changed": another tier or score than the device's last result this watch saw. The watch
learns results as they come, so the first result of each device after the verifier starts
is sent whatever it is (its score before is not known here): once per device and start,
rather than a change missed.

Several processes on one database (verifier/workers.py): a watcher on one must see the
decisions made on the others, so there the watch ``follow``s the store's change feed instead
of its own process's decisions: every process's changed tiers and scores, in the order they
were stored, within the feed's poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.decision import Decision
from devtrust.verifier.errors import ResourceExhausted
from devtrust.verifier.storage.changes import TRUST, Change, ChangeFeed
from devtrust.verifier.trust import TrustResult

logger = logging.getLogger(__name__)

# Changes one watcher may be behind before it is dropped.
QUEUE_SIZE = 1024
# Watchers at once: each holds a queue.
MAX_WATCHERS = 1024


@dataclass(frozen=True)
class WatchFilter:
    """Which devices a watcher follows; empty: all."""

    zone: str = ""
    device_id: DeviceId | None = None
    # Send each matching device's current result first.
    initial: bool = False

    def matches(self, device_id: DeviceId, zone: str) -> bool:
        if self.device_id is not None and device_id != self.device_id:
            return False
        return not self.zone or zone == self.zone


@dataclass(frozen=True)
class TrustChange:
    """A device's result as a watcher gets it. ``result`` None: never appraised (tier
    none), in the initial results only. ``end_of_initial``: the last of the initial results
    (alone, with no device, when there were none)."""

    device_id: DeviceId | None
    zone: str
    previous_tier: Tier | None
    result: TrustResult | None
    end_of_initial: bool = False


class Subscription:
    """One watcher: its filter and queue. Iterate with ``next``; ``close`` when done."""

    def __init__(self, watch: TrustWatch, where: WatchFilter, size: int) -> None:
        self.filter = where
        self._watch = watch
        self._queue: asyncio.Queue[TrustChange | None] = asyncio.Queue(maxsize=size)
        self._size = size
        self.dropped = False

    def offer(self, change: TrustChange) -> bool:
        """Queue ``change``; False (and dropped) when the watcher is a whole queue behind."""
        try:
            self._queue.put_nowait(change)
        except asyncio.QueueFull:
            self.dropped = True
            return False
        return True

    def end(self) -> None:
        """The watch is closing: the watcher gets what is queued, then its stream ends."""
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self.dropped = True

    async def next(self) -> TrustChange | None:
        """The next change; None once the watch closed. ResourceExhausted once dropped:
        changes were missed, and it says so rather than go on with a gap."""
        if self.dropped:
            raise self._behind()
        change = await self._queue.get()
        if change is None and self.dropped:  # dropped while waiting (``drop``)
            raise self._behind()
        return change

    def drop(self) -> None:
        """Changes were lost before they reached this watcher: its next read says so."""
        self.dropped = True
        self.end()

    def _behind(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"this watch fell {self._size} changes behind and was dropped, so that it "
            "holds up no attestation: watch again (with initial set to read the current "
            "results) and read faster, or filter by zone or device"
        )

    def close(self) -> None:
        self._watch.unsubscribe(self)


class TrustWatch:
    """A DecisionSink (after the store: every result it sends is committed)."""

    def __init__(self, *, queue_size: int = QUEUE_SIZE, max_watchers: int = MAX_WATCHERS) -> None:
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self._watchers: list[Subscription] = []
        self._last: dict[DeviceId, tuple[Tier, int]] = {}
        self._closed = False
        self._fed = False

    def follow(self, feed: ChangeFeed) -> None:
        """Take every process's changes from ``feed`` (this one's too), no longer the
        decisions published to this sink."""
        self._fed = True
        feed.subscribe(self._on_changes, on_gap=self._on_gap)

    def subscribe(self, where: WatchFilter) -> Subscription:
        """A new watcher, receiving every change published from now on."""
        if self._closed:
            raise ResourceExhausted("the verifier is stopping: watch again in a moment")
        if len(self._watchers) >= self._max_watchers:
            raise ResourceExhausted(
                f"{len(self._watchers)} watches are open, the most this verifier serves: "
                "close one, or retry later"
            )
        sub = Subscription(self, where, self._queue_size)
        self._watchers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._watchers:
            self._watchers.remove(sub)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def _changed(self, device_id: DeviceId, result: TrustResult) -> bool:
        now = (result.tier, result.score)
        last = self._last.get(device_id)
        self._last[device_id] = now
        return last is None or last != now

    async def publish(self, decision: Decision) -> None:
        if self._fed:  # the change feed brings it, with every other process's
            return
        self._send(
            TrustChange(
                device_id=decision.device_id,
                zone=decision.zone,
                previous_tier=decision.previous_tier,
                result=decision.result,
            )
        )

    async def _on_changes(self, changes: Sequence[Change]) -> None:
        for change in changes:
            if change.kind == TRUST and change.result is not None:
                self._send(
                    TrustChange(
                        device_id=change.device_id,
                        zone=change.zone,
                        previous_tier=change.previous_tier,
                        result=change.result,
                    )
                )

    async def _on_gap(self) -> None:
        """Changes were lost unread: every watcher is dropped (it watches again)."""
        for sub in self._watchers:
            sub.drop()
        self._watchers.clear()

    def _send(self, change: TrustChange) -> None:
        device_id, result = change.device_id, change.result
        assert device_id is not None
        assert result is not None
        if not self._changed(device_id, result):
            return
        for sub in list(self._watchers):
            if sub.filter.matches(device_id, change.zone) and not sub.offer(change):
                self.unsubscribe(sub)
                logger.warning(
                    "trust watch dropped: %d changes behind (zone filter %r, device %s)",
                    self._queue_size,
                    sub.filter.zone,
                    sub.filter.device_id or "any",
                )

    def close(self) -> None:
        """End every watch (the verifier stops)."""
        self._closed = True
        for sub in self._watchers:
            sub.end()
        self._watchers.clear()
