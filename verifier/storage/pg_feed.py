"""The change feed on PostgreSQL: the neutral reader of ``feed`` (rows and consumers:
``changes``) woken by LISTEN/NOTIFY.

The triggers of migration 0005 NOTIFY ``devtrust_changes`` in every transaction that writes
a change; PostgreSQL delivers it at commit. A watcher thread LISTENs on a connection of its
own and wakes the loop on each notification, and every POLL_S anyway (a notification sent
while its connection was down is lost; the rows are not). When the server restarts, the
watcher reconnects and wakes the loop once: the reader reads by seq what it missed. Rows are
read through the engine's read-only transactions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from devtrust.verifier.storage.changes import Batch, newest, read_after
from devtrust.verifier.storage.feed import KEEP, PRUNE_EVERY_S, FeedReader
from devtrust.verifier.storage.pg_engine import PgEngine, hide

logger = logging.getLogger(__name__)
CHANNEL = "devtrust_changes"
# The poll beside the notifications: what another replica changed reaches this one within
# this even if its notification was lost.
POLL_S = 1.0
# How long the watcher blocks waiting for a notification before it looks whether to stop.
_WAIT_S = 0.2
RECONNECT_WAIT_S = 1.0


class PgChangeFeed(FeedReader):
    """``changes.ChangeFeed`` over a PostgreSQL database."""

    def __init__(
        self,
        engine: PgEngine,
        conninfo: str,
        *,
        origin: str,
        interval_s: float = POLL_S,
        keep: int = KEEP,
        prune_every_s: float = PRUNE_EVERY_S,
    ) -> None:
        super().__init__(engine, origin=origin, keep=keep, prune_every_s=prune_every_s)
        self._pg = engine
        self._conninfo = conninfo
        self._interval_s = interval_s

    async def _open(self) -> int:
        return await self._pg.read(newest)

    async def _fetch(self) -> Batch:
        seq = self._seq
        return await self._pg.read(lambda db: read_after(db, seq))

    def _watch(self, wake: Callable[[], None]) -> None:
        while not self._stopping.is_set():
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
            except psycopg.Error as exc:
                shown = hide(str(exc), self._pg.secrets)
                logger.warning("change feed: cannot LISTEN (%s): trying again", shown)
                self._stopping.wait(RECONNECT_WAIT_S)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                wake()  # read what was committed while not listening
                self._listen(conn, wake)
            except psycopg.Error as exc:
                if not self._stopping.is_set():
                    shown = hide(str(exc), self._pg.secrets)
                    logger.warning("change feed: LISTEN connection lost (%s): reconnecting", shown)
                    self._stopping.wait(RECONNECT_WAIT_S)
            except RuntimeError:
                raise  # the loop closed: the feed is gone
            except Exception:  # a bug must not end the watching: log it, listen again
                logger.exception("change feed: LISTEN failed: reconnecting")
                self._stopping.wait(RECONNECT_WAIT_S)
            finally:
                conn.close()

    def _listen(self, conn: psycopg.Connection[object], wake: Callable[[], None]) -> None:
        polled = time.monotonic()
        while not self._stopping.is_set():
            notified = False
            for _ in conn.notifies(timeout=_WAIT_S, stop_after=1):
                notified = True
            now = time.monotonic()
            if notified or now - polled >= self._interval_s:
                polled = now
                wake()
