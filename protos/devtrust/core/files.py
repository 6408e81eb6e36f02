"""Writing files that other processes read: atomically, with restrictive modes."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int, group: int | None = None) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half.
    ``group``: the file's group, set before the rename (a group-readable key is never there
    with another group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with open(fd, "wb") as fh:
        if group is not None:
            os.fchown(fh.fileno(), -1, group)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
