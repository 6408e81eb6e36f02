"""GPU state kept between challenges: collected again only when its source changed.

``CaptureCache``: an ``nvidia-smi -q -x`` capture is parsed again only when the file's
fingerprint changed: device, inode, size, modification and change times (``os.stat``; a
capture replaced by rename has a new inode, one rewritten in place a new size or times). An
unreadable or malformed capture is reported as unavailable, and not kept: the next
challenge tries again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from devtrust.v1 import attestation_pb2

Stamp = tuple[int, int, int, int, int]


def file_stamp(st: os.stat_result) -> Stamp:
    """What says a file changed without reading it: (device, inode, size, mtime, ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CaptureCache:
    """``parse(bytes)`` of the file at ``path``, parsed again only when its stamp changed.
    The state returned is shared between calls: callers copy it (an EvidenceBody does) and
    never change it."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[bytes], attestation_pb2.GpuState],
        error: Callable[[Exception], attestation_pb2.GpuState],
        errors: tuple[type[Exception], ...] = (),
        *,
        stat: Callable[[int], os.stat_result] = os.fstat,
    ) -> None:
        self._path = path
        self._parse = parse
        self._error = error
        self._errors: tuple[type[Exception], ...] = (OSError, *errors)
        self._stat = stat
        self._stamp: Stamp | None = None
        self._state: attestation_pb2.GpuState | None = None
        self.parses = 0

    def __call__(self) -> attestation_pb2.GpuState:
        try:
            with self._path.open("rb") as f:
                stamp = file_stamp(self._stat(f.fileno()))
                if stamp == self._stamp and self._state is not None:
                    return self._state
                data = f.read()
            self.parses += 1
            state = self._parse(data)
        except self._errors as exc:
            self._stamp, self._state = None, None
            return self._error(exc)
        self._stamp, self._state = stamp, state
        return state
