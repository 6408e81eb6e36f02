"""Log lines for both daemons and the tools: one format, timestamps in ISO 8601 with the
UTC offset (``2026-12-01T15:16:48.123+00:00``), so that lines from an agent and a verifier in
different places sort and compare."""

from __future__ import annotations

import datetime
import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class IsoFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).astimezone()
        return moment.isoformat(timespec="milliseconds")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (a test's capture, a
    redirected stream), not to the one it was made with."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(level: int) -> None:
    """Send records of ``level`` and above to stderr, one line each."""
    handler = _Stderr()
    handler.setFormatter(IsoFormatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
