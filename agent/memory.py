"""Giving back the resident memory the agent used to start and no longer needs.

Most of an idle agent's resident set is not its data but the pages of the libraries it
loaded (gRPC core, cryptography's Rust and OpenSSL, tpm2-tss, libpython), mapped in while
imports, relocations, configuration parsing, TLS set-up and enrollment ran; and heap freed
since. After the first attestation ``release_startup_memory``:

- hands free heap back to the kernel (glibc ``malloc_trim``);
- unmaps (``madvise(MADV_DONTNEED)``) the pages of shared libraries that the process has
  only read or executed: read-only mappings of a ``.so`` file holding no page of its own
  (``Anonymous`` 0: no copy-on-write page, such as relocated data, which would be lost). Such
  pages are the file's, in the page cache: the next use maps them again from there (a minor
  fault); those never used again are no longer this process's. What one attestation touches
  comes back at the next, so the resident set settles at what the agent uses.

DONTNEED on a range that had meanwhile become something else (a library unloaded and its
addresses reused) would zero live memory, so each range is checked again in
``/proc/self/maps`` just before its call (same addresses, permissions, offset, inode and
file), and the agent runs the release on its TPM thread (``AsyncTpm.run``), the one thread
that may load and unload a library (a TCTI, when the TPM connection is reopened); Python
never unloads an extension module. MADV_PAGEOUT, which never discards data, was tried: it
leaves every page that another process maps too (another Python process of the same
environment), so the agent's resident set barely moved where two agents ran side by side.

Only shared objects are touched, never glibc's iconv modules (the one kind of library
unloaded at run time), and nothing writable: an address range of a library is not reused
while the library stays loaded, and CPython never unloads an extension module. Linux with
glibc only; elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import sys

logger = logging.getLogger(__name__)
MADV_DONTNEED = 4
_VMA = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError):
        return None
    return libc


def _candidates(smaps: str) -> list[tuple[int, int, int]]:
    """(start, end, resident kB) of the read-only, unmodified mappings of shared objects."""
    entries: list[tuple[int, int, bool, dict[str, int]]] = []
    for line in smaps.splitlines():
        match = _VMA.match(line)
        if match:
            start, end, perms, path = match.groups()
            wanted = (
                perms[1] == "-"
                and perms[3] == "p"
                and ".so" in path.rsplit("/", 1)[-1]
                and "/gconv/" not in path
            )
            entries.append((int(start, 16), int(end, 16), wanted, {}))
            continue
        key, _, value = line.partition(":")
        fields = value.split()
        if entries and len(fields) == 2 and fields[1] == "kB":
            entries[-1][3][key] = int(fields[0])
    out = []
    for start, end, wanted, kb in entries:
        own = kb.get("Anonymous", 1) + kb.get("Private_Dirty", 1) + kb.get("Shared_Dirty", 1)
        if wanted and own == 0 and kb.get("Rss", 0) > 0:
            out.append((start, end, kb["Rss"]))
    return out


def release_startup_memory() -> int:
    """Give back free heap and unused library pages; the kB of library pages unmapped."""
    libc = _libc()
    if libc is None:
        return 0
    libc.malloc_trim(0)
    try:
        with open("/proc/self/smaps") as f:
            smaps = f.read()
    except OSError:
        return 0
    released = 0
    for start, end, resident in _candidates(smaps):
        # The range must still be the same mapping of the same file right now.
        if _mapping(start, end) != _mapping_in(smaps, start, end):
            continue
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += resident
    logger.debug("released %d kB of library pages", released)
    return released


def _mapping_in(text: str, start: int, end: int) -> str | None:
    """The line of /proc/self/maps or smaps for exactly [start, end), without its address."""
    prefix = f"{start:x}-{end:x} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return " ".join(line[len(prefix) :].split())
    return None


def _mapping(start: int, end: int) -> str | None:
    try:
        with open("/proc/self/maps") as f:
            return _mapping_in(f.read(), start, end)
    except OSError:
        return None
