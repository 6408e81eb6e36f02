"""The posture watch: one per process, however many clients listen (DESIGN.md flow 2).

The cheap signals of ``posture.WATCHED`` are polled every ``interval_s``; the first change is
passed on at once, later ones are debounced and coalesced (``posture.Debouncer``). Every
subscribed listener gets each note. The poll runs while someone listens: it starts with the
first subscription and stops with the last, so a simulator with thousands of clients on one
host probe polls once, not thousands of times.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from devtrust.agent.interfaces import PostureListener, Unsubscribe
from devtrust.agent.posture import Debouncer, fingerprint

logger = logging.getLogger(__name__)
Fingerprint = Callable[[Path], dict[str, bytes]]


class PostureWatcher:
    def __init__(
        self,
        root: Path,
        *,
        interval_s: float,
        debounce_s: float,
        probe: Fingerprint = fingerprint,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._interval = interval_s
        self._debounce = debounce_s
        self._probe = probe
        self._clock = clock
        self._listeners: dict[int, PostureListener] = {}
        self._next_id = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def subscribe(self, listener: PostureListener) -> Unsubscribe:
        """Pass each posture note to ``listener`` until the returned call removes it. Call
        it on the event loop the watch is to run on."""
        key, self._next_id = self._next_id, self._next_id + 1
        self._listeners[key] = listener
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="posture")
            self._task.add_done_callback(_report)

        def unsubscribe() -> None:
            self._listeners.pop(key, None)
            if not self._listeners and self._task is not None:
                self._task.cancel()
                self._task = None

        return unsubscribe

    async def _watch(self) -> None:
        """Poll the signals. The first change goes at once, so a verifier challenges within
        the poll interval plus one round trip; changes in the following ``debounce_s`` go
        as one note when that window closes."""
        debouncer = Debouncer(self._debounce)
        last = await asyncio.to_thread(self._probe, self._root)
        while True:
            await asyncio.sleep(self._interval)
            current = await asyncio.to_thread(self._probe, self._root)
            changed = sorted(k for k in current if current[k] != last.get(k))
            last = current
            send = debouncer.changed(changed, self._clock())
            if send:
                logger.info("posture changed: %s", ", ".join(send))
                for listener in list(self._listeners.values()):
                    listener(list(send))
            elif changed:
                logger.debug("posture changed (held): %s", ", ".join(changed))


def _report(task: asyncio.Task[None]) -> None:
    """A watch that died says so: the agent then attests on the verifier's schedule only."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("posture watch stopped: %r", task.exception())
