"""The reader of the change feed every backend shares (``changes.ChangeFeed``): the
consumers, reading in seq order one batch at a time, the poller task woken by the backend's
watcher thread, pruning. A backend says how it notices that another process committed
(``_watch``, ``_mark``), how it reads (``_fetch``) and what it opens and releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

from devtrust.verifier.storage.changes import (
    PAGE,
    Batch,
    GapHandler,
    Handler,
    insert_change,
    prune_rows,
)
from devtrust.verifier.storage.sql import Connection, Engine

logger = logging.getLogger(__name__)
# How long closing waits for the reader task and the watcher thread, each.
CLOSE_S = 2.0
# Rows kept; older ones are pruned. Every running process reads within a poll, and one that
# starts reads the state itself, so only a process stalled this many changes behind needs
# more (it reloads: on_gap). A trust change's row holds its result (about 2 KB with 8 GPUs):
# 20,000 rows stay near 40 MB.
KEEP = 20_000
PRUNE_EVERY_S = 60.0


class FeedReader:
    """``ChangeFeed`` but for the backend's hooks."""

    def __init__(
        self,
        engine: Engine,
        *,
        origin: str,
        keep: int = KEEP,
        prune_every_s: float = PRUNE_EVERY_S,
    ) -> None:
        self._engine = engine
        self.origin = origin
        self._keep = keep
        self._prune_every_s = prune_every_s
        self._version: object = None
        self._seq = 0
        self._handlers: list[Handler] = []
        self._gap_handlers: list[GapHandler] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._moved = asyncio.Event()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- the backend's part ---------------------------------------------------------------

    async def _open(self) -> int:
        """Whatever the backend reads with; the newest row's seq now."""
        raise NotImplementedError

    def _mark(self) -> object:
        """Something that moves whenever another process commits, looked at on the loop
        (SQLite: data_version); None: unknown, read."""
        return None

    async def _fetch(self) -> Batch:
        """The rows after ``seq`` (``changes.read_after``)."""
        raise NotImplementedError

    def _watch(self, wake: Callable[[], None]) -> None:
        """The watcher thread: calls ``wake`` when another process may have committed, until
        ``_stopping`` is set."""
        raise NotImplementedError

    async def _release(self) -> None:
        """Release what ``_open`` took."""

    # --- the consumers' part --------------------------------------------------------------

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
        self._seq = await self._open()

    def run(self) -> None:
        """Follow the database from now on: a watcher thread wakes the loop only when
        another process may have committed, so an idle verifier's loop is not woken for
        nothing."""
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="change-feed")
            loop = asyncio.get_running_loop()

            def wake() -> None:
                loop.call_soon_threadsafe(self._moved.set)

            def watch() -> None:
                try:
                    self._watch(wake)
                except RuntimeError:  # the loop closed first
                    return

            self._watcher = threading.Thread(target=watch, name="changes-watch", daemon=True)
            self._watcher.start()

    async def aclose(self) -> None:
        """Stop following, release the connection; again: nothing."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        # Each bounded: a stop must not hang on the feed (a drain waited here for ever, now
        # and then, under load: which of the two never finished is not known yet).
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=CLOSE_S)
            if not done:
                logger.warning("change feed: its reader did not end within %g s", CLOSE_S)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await asyncio.to_thread(watcher.join, CLOSE_S)
            if watcher.is_alive():
                logger.warning(
                    "change feed: its watcher thread did not stop within %g s: left to end "
                    "with the process",
                    CLOSE_S,
                )
        await self._release()

    async def catch_up(self) -> int:
        """Read and hand out every row committed so far; the number of rows. One reader at
        a time, so that consumers get rows once and in order."""
        count = 0
        async with self._lock:
            while True:
                version = self._mark()
                if version is not None and version == self._version:
                    return count
                found = await self._fetch()
                if found.read < PAGE:
                    self._version = version  # all committed as of ``version`` was read
                if found.gap:
                    logger.warning(
                        "change feed: rows after %d were pruned or unreadable: reloading",
                        self._seq,
                    )
                    for on_gap in self._gap_handlers:
                        await self._safely(on_gap)
                if not found.read:
                    return count
                self._seq = found.last
                count += len(found.changes)
                if found.changes:
                    for handler in self._handlers:
                        await self._safely(handler, found.changes)
                if found.read < PAGE:
                    return count

    async def announce(self, kind: str, *, ref: str = "", device_id: str = "") -> None:
        """A row written by this process (origin: this feed's), for what no trigger sees."""

        def work(db: Connection) -> None:
            insert_change(db, kind, device_id=device_id, ref=ref, origin=self.origin)

        await self._engine.write(work)

    async def prune(self) -> int:
        """Drop the rows before the newest ``keep``; how many. Idempotent: any process."""
        return await self._engine.write(lambda db: prune_rows(db, self._keep))

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

    async def _safely(self, handler: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await handler(*args)
        except Exception:
            logger.exception("change feed: a consumer failed on rows up to %d", self._seq)
