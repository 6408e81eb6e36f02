"""Log lines for both daemons and the tools: timestamps in ISO 8601 with the UTC offset
(``2026-12-01T15:16:48.123+00:00``), so that lines from an agent and a verifier in different
places sort and compare.

Two formats (``--log-format`` of the daemons): ``text``, the default, one line per record for
people and journald; ``json``, one JSON object per line for log shippers: ``ts``, ``level``,
``logger``, ``message``, then every attribute the log call gave in ``extra=`` (a value JSON
cannot hold as it is, as its ``str``), and ``exception`` with the traceback when there is one.

Device-supplied text is escaped in the message by the code that logs it (verifier/logtext.py);
in JSON the encoder escapes whatever is left, so a line is always one valid JSON object,
whatever a message or an extra value holds. ``ensure_ascii`` stays on: every character
outside ASCII becomes a ``\\uXXXX`` escape, so a line is pure ASCII and never fails to encode
(a lone surrogate from a file name decoded with surrogateescape would make a UTF-8 stream
raise and the record be lost), and a bidi override or U+2028 in a value cannot reshape what a
person reading the raw stream sees. Shippers decode the escapes back.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
# What every LogRecord has: the rest of its attributes came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class IsoFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)


def iso_time(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC).astimezone()
    return moment.isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line. ``fields``: added to every object (a
    worker's name and pid)."""

    def __init__(self, fields: dict[str, object] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._fields,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(doc, default=str, ensure_ascii=True, allow_nan=False)
        except (ValueError, TypeError):
            # NaN or Infinity (not JSON: strict parsers reject the line), or a dict with keys
            # that are not strings: the values made plain, never a text traceback instead.
            return json.dumps(_plain(doc), default=str, ensure_ascii=True, allow_nan=False)


def _plain(value: object) -> object:
    """``value`` with every float that is not finite as a string, every key a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def formatter(
    log_format: str, *, text: str = FORMAT, fields: dict[str, object] | None = None
) -> logging.Formatter:
    """The formatter of ``log_format`` (FORMATS): ``text`` with the line format ``text``,
    ``json`` with ``fields`` in every object."""
    if log_format == "json":
        return JsonFormatter(fields)
    if log_format != "text":
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    return IsoFormatter(text)


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


def configure_logging(level: int, log_format: str = "text") -> None:
    """Send records of ``level`` and above to stderr, one line each, in ``log_format``."""
    handler = _Stderr()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
