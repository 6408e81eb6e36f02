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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.decision import Decision
from devtrust.verifier.errors import ResourceExhausted
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
            raise ResourceExhausted(
                f"this watch fell {self._size} changes behind and was dropped, so that it "
                "holds up no attestation: watch again (with initial set to read the current "
                "results) and read faster, or filter by zone or device"
            )
        return await self._queue.get()

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

    def _changed(self, decision: Decision) -> bool:
        result = decision.result
        now = (result.tier, result.score)
        last = self._last.get(decision.device_id)
        self._last[decision.device_id] = now
        return last is None or last != now

    async def publish(self, decision: Decision) -> None:
        if not self._changed(decision):
            return
        change = TrustChange(
            device_id=decision.device_id,
            zone=decision.zone,
            previous_tier=decision.previous_tier,
            result=decision.result,
        )
        for sub in list(self._watchers):
            if sub.filter.matches(decision.device_id, decision.zone) and not sub.offer(change):
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
