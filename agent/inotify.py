"""Linux inotify through libc (ctypes), and ``FileWatch``: "these paths may have changed"
for regular files and directories, on the event loop, without polling.

Each path is watched twice: itself (following symlinks, so a symlinked sshd_config's target
counts) and its parent directory, where creating, deleting, renaming over (as editors save)
or re-creating it shows. A path that does not exist yet is watched through its nearest
existing ancestor. After every batch of events the watches are armed again (inotify gives a
new inode a new watch; a deleted one drops its own), then the owner is told, so the owner's
read after that sees every change that was made before or during the batch.

Pseudo files (/proc, /sys) give no inotify events when the kernel changes them: the posture
watch polls those (agent/watch.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# One mask for every watch: inotify replaces a watch's mask when the same inode is added
# again, and a directory may be both a watched path and a watched path's parent.
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class Inotify:
    """One inotify instance (non-blocking, close-on-exec). Raises OSError where the kernel
    or libc has none, or the user's instance limit (fs.inotify.max_user_instances) is
    reached."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        libc = ctypes.CDLL(name, use_errno=True)
        try:
            self._add = libc.inotify_add_watch
            init = libc.inotify_init1
        except AttributeError as exc:
            raise OSError(errno.ENOSYS, "libc has no inotify") from exc
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add.restype = ctypes.c_int
        init.argtypes = (ctypes.c_int,)
        init.restype = ctypes.c_int
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self.fd = fd

    def add_watch(self, path: Path, mask: int = MASK) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_add_watch {path}: {os.strerror(code)}")
        return int(wd)

    def read(self) -> list[tuple[int, int, str]]:
        """The events queued now, as (wd, mask, name); none when the queue is empty."""
        events: list[tuple[int, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, size = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + size].rstrip(b"\0")
                offset += size
                events.append((wd, mask, os.fsdecode(name)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileWatch:
    """Calls ``changed`` (on the event loop) after changes to any of ``paths``, ``settle_s``
    after the first event of a burst, so that a save's truncate, write and rename are read
    once, as the file they leave. Start it on the loop it is to run on; ``close`` ends it."""

    def __init__(
        self, paths: Iterable[Path], changed: Callable[[], None], *, settle_s: float = 0.05
    ) -> None:
        self._paths = list(paths)
        self._changed = changed
        self._settle = settle_s
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None
        self.events = 0  # batches read, for tests

    def start(self) -> None:
        """Watch; raises OSError where inotify cannot be used (the caller polls instead)."""
        self._inotify = Inotify()
        try:
            self._arm()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._inotify.fd, self._ready)
        except BaseException:
            self._inotify.close()
            self._inotify = None
            raise

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None

    def _arm(self) -> None:
        """A watch on each path that exists and on its parent (or nearest existing
        ancestor). A path that went away meanwhile is no error: its ancestor shows it."""
        assert self._inotify is not None
        for path in self._paths:
            for target in (path, _existing_ancestor(path.parent)):
                if target is None:
                    continue
                try:
                    self._inotify.add_watch(target)
                except FileNotFoundError:
                    continue
                except NotADirectoryError:
                    continue

    def _ready(self) -> None:
        if self._inotify is None:
            return
        events = self._inotify.read()
        if not events:
            return
        self.events += 1
        if all(mask == IN_IGNORED for _, mask, _ in events):
            return  # a watch on a deleted inode went; the deletion itself came before
        if self._pending is None and self._loop is not None:
            self._pending = self._loop.call_later(self._settle, self._fire)

    def _fire(self) -> None:
        self._pending = None
        if self._inotify is None:
            return
        try:
            self._arm()  # before the owner reads: later changes raise events again
        except OSError as exc:  # the watch limit (fs.inotify.max_user_watches), say
            logger.warning("posture files: cannot watch again: %s", exc)
        self._changed()


def _existing_ancestor(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return None
