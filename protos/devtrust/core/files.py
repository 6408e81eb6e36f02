"""Writing files that other processes read: atomically, with the modes asked for."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int, group: int | None = None) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half.
    ``mode`` is set on the open file (fchmod) before the rename, whatever the umask: under
    the units' UMask=0077 the mode given to open() alone would make a certificate that
    workloads or relying parties read 0600; and a chmod of the path after the rename would
    follow a symlink put there meanwhile. ``group``: the file's group, set before the rename
    too (a group-readable key is never there with another group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o600)
    with open(fd, "wb") as fh:
        if group is not None:
            os.fchown(fh.fileno(), -1, group)
        os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
