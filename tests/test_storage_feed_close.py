"""Closing a change feed is bounded (verifier/storage/feed.py ``aclose``): a drain waited
for ever, now and then under load, after its streams had ended, for a feed whose watcher
thread or reader did not end. A watcher that never looks at its stop flag and a reader stuck
in a read are both left behind after ``CLOSE_S``, with a warning, and the stop goes on."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from devtrust.verifier.storage import feed
from devtrust.verifier.storage.changes import Batch
from devtrust.verifier.storage.feed import FeedReader


class StuckFeed(FeedReader):
    """A feed whose watcher ignores the stop flag and whose reads never return."""

    def __init__(self, release: threading.Event) -> None:
        engine: Any = None  # nothing is read through an engine here
        super().__init__(engine, origin="stuck", prune_every_s=3600.0)
        self._let_go = release

    async def _open(self) -> int:
        return 0

    async def _fetch(self) -> Batch:
        await asyncio.Event().wait()  # never set: a read that does not come back
        raise AssertionError("unreachable")

    def _watch(self, wake: Callable[[], None]) -> None:
        wake()  # the reader starts its read, which never ends
        self._let_go.wait(30.0)


def test_a_feed_that_does_not_stop_is_left_behind_within_the_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(feed, "CLOSE_S", 0.3)
    release = threading.Event()

    async def scenario() -> float:
        stuck = StuckFeed(release)
        await stuck.open()
        stuck.run()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await stuck.aclose()
        return time.monotonic() - started

    try:
        with caplog.at_level(logging.WARNING):
            took = asyncio.run(scenario())
    finally:
        release.set()
    assert took < 5.0
    assert "its watcher thread did not stop" in caplog.text
