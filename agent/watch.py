"""The posture watch: one per process, however many clients listen (DESIGN.md flow 2).

The cheap signals of ``signals.WATCHED`` are watched two ways. Regular files (sshd's
configuration) are watched with inotify (``inotify.FileWatch``): a change is read when the
kernel says so, not polled for. Kernel pseudo files (/proc, /sys: modules, listeners, the
port range, SELinux, lockdown, the NVIDIA driver) give no such events and are polled every
``interval_s``, on the event loop, each file read once (``signals.Fingerprinter``). Where
inotify cannot be used (no kernel support, the user's instance limit reached) every signal
is polled, and a log line says so.

The first change is passed on at once, later ones are debounced and coalesced
(``signals.Debouncer``): one note per window. Every subscribed listener gets each note. The
watch runs while someone listens: it starts with the first subscription and stops with the
last, so a simulator with thousands of clients on one host probe watches once, not
thousands of times. A ``probe`` given instead is polled alone, every ``interval_s``, on a
worker thread (tests, and hosts that are not a directory tree).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from devtrust.agent.inotify import FileWatch
from devtrust.agent.interfaces import PostureListener, Unsubscribe
from devtrust.agent.signals import WATCHED, Debouncer, Fingerprinter, pseudo

logger = logging.getLogger(__name__)
Fingerprint = Callable[[Path], dict[str, bytes]]


class PostureWatcher:
    def __init__(
        self,
        root: Path,
        *,
        interval_s: float,
        debounce_s: float,
        probe: Fingerprint | None = None,
        clock: Callable[[], float] = time.monotonic,
        inotify: bool = True,
    ) -> None:
        self._root = root
        self._interval = interval_s
        self._debounce = debounce_s
        self._probe = probe
        self._clock = clock
        self._inotify = inotify
        self._listeners: dict[int, PostureListener] = {}
        self._next_id = 0
        self._task: asyncio.Task[None] | None = None
        self._debouncer = Debouncer(debounce_s)
        self._wake: asyncio.Future[None] | None = None
        self._files_changed = False
        self.files: FileWatch | None = None  # while inotify watches (tests look)
        self.ready = asyncio.Event()  # set once the first fingerprints are read

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def held(self) -> frozenset[str]:
        """Signals changed within the open debounce window, not sent yet."""
        return self._debouncer.held

    def subscribe(self, listener: PostureListener) -> Unsubscribe:
        """Pass each posture note to ``listener`` until the returned call removes it. Call
        it on the event loop the watch is to run on."""
        key, self._next_id = self._next_id, self._next_id + 1
        self._listeners[key] = listener
        if self._task is None:
            watch = self._poll_probe() if self._probe is not None else self._watch()
            self._task = asyncio.get_running_loop().create_task(watch, name="posture")
            self._task.add_done_callback(_report)

        def unsubscribe() -> None:
            self._listeners.pop(key, None)
            if not self._listeners and self._task is not None:
                self._task.cancel()
                self._task = None

        return unsubscribe

    def _emit(self, changed: list[str]) -> None:
        send = self._debouncer.changed(changed, self._clock())
        if send:
            logger.info("posture changed: %s", ", ".join(send))
            for listener in list(self._listeners.values()):
                listener(list(send))
        elif changed:
            logger.debug("posture changed (held): %s", ", ".join(changed))

    async def _poll_probe(self) -> None:
        """Poll ``probe``. The first change goes at once, so a verifier challenges within
        the poll interval plus one round trip; changes in the following ``debounce_s`` go
        as one note when that window closes."""
        assert self._probe is not None
        self._debouncer = Debouncer(self._debounce)
        last = await asyncio.to_thread(self._probe, self._root)
        self.ready.set()
        while True:
            await asyncio.sleep(self._interval)
            current = await asyncio.to_thread(self._probe, self._root)
            self._emit(sorted(k for k in current if current[k] != last.get(k)))
            last = current

    async def _watch(self) -> None:
        """Pseudo files polled, the others watched; the loop sleeps until the next poll,
        the end of the debounce window, or the inotify watch's word."""
        loop = asyncio.get_running_loop()
        self._debouncer = Debouncer(self._debounce)
        polled = [s for s in WATCHED if pseudo(s)]
        evented = [s for s in WATCHED if not pseudo(s)]
        self.files = self._start_files(evented) if evented and self._inotify else None
        if self.files is None:
            polled, evented = polled + evented, []
        poll, read = Fingerprinter(self._root, polled), Fingerprinter(self._root, evented)
        logger.info(
            "watching posture: %s; polling every %.2f s: %s",
            f"inotify on {', '.join(evented)}" if evented else "no inotify",
            self._interval,
            ", ".join(polled),
        )
        last = {**poll(), **read()}
        self.ready.set()
        next_poll = loop.time() + self._interval
        try:
            while True:
                self._wake = loop.create_future()
                wake_at = next_poll
                closes = self._debouncer.closes_at
                if closes is not None and self._debouncer.held:
                    wake_at = min(wake_at, loop.time() + max(0.0, closes - self._clock()))
                timer = loop.call_at(wake_at, _resolve, self._wake)
                try:
                    await self._wake
                finally:
                    timer.cancel()
                current: dict[str, bytes] = {}
                if self._files_changed:
                    self._files_changed = False
                    current.update(read())
                if loop.time() >= next_poll:
                    current.update(poll())
                    next_poll = max(next_poll + self._interval, loop.time())
                self._emit(sorted(k for k in current if current[k] != last.get(k)))
                last.update(current)
        finally:
            self.ready.clear()
            poll.close()
            read.close()
            if self.files is not None:
                self.files.close()
                self.files = None

    def _start_files(self, signals: list[str]) -> FileWatch | None:
        paths = [self._root / rel for s in signals for rel in WATCHED[s]]
        files = FileWatch(paths, self._on_files)
        try:
            files.start()
        except OSError as exc:
            logger.warning(
                "inotify unavailable (%s): polling %s every %.2f s instead",
                exc.strerror or exc,
                ", ".join(signals),
                self._interval,
            )
            return None
        return files

    def _on_files(self) -> None:
        self._files_changed = True
        _resolve(self._wake)


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _report(task: asyncio.Task[None]) -> None:
    """A watch that died says so: the agent then attests on the verifier's schedule only."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("posture watch stopped: %r", task.exception())
