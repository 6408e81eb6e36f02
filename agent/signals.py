"""The cheap posture signals the agent watches for PostureChanged (DESIGN.md flow 2), their
fingerprints, and the debounce of their changes (the rules: agent/posture.py's docstring).

Two kinds of signal (``pseudo``): those read from /proc and /sys, which the kernel changes
without inotify events, are polled; the others (sshd's configuration) are regular files,
watched with inotify (agent/watch.py). A ``Fingerprinter`` reads one set of signals as
cheaply as Python can: each file once per call (the ephemeral port range too, which both
``ephemeral_ports`` and ``listening_sockets`` need), with plain ``os`` calls.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from devtrust.agent.netlink import SockDiag

logger = logging.getLogger(__name__)
PORT_RANGE = "proc/sys/net/ipv4/ip_local_port_range"
RESERVED_PORTS = "proc/sys/net/ipv4/ip_local_reserved_ports"
DEFAULT_EPHEMERAL = (32768, 60999)  # the kernel's default ip_local_port_range

WATCHED = {
    "kernel_modules": ["proc/modules"],
    "gpu_driver": ["proc/driver/nvidia/version"],
    "sshd_config": ["etc/ssh/sshd_config", "etc/ssh/sshd_config.d"],
    "listening_sockets": ["proc/net/tcp", "proc/net/tcp6"],
    "ephemeral_ports": [PORT_RANGE, RESERVED_PORTS],
    "selinux_mode": ["sys/fs/selinux/enforce"],
    "lockdown": ["sys/kernel/security/lockdown"],
}
"""Each signal and the paths (relative to the posture root) it is read from."""

_PSEUDO = ("proc/", "sys/")


def pseudo(signal: str) -> bool:
    """Whether ``signal`` is read from kernel pseudo files (polled: no inotify events)."""
    return any(rel.startswith(_PSEUDO) for rel in WATCHED[signal])


@dataclass(frozen=True)
class EphemeralPorts:
    """The ports the kernel hands out to port-0 binds: ``low..high`` less the reserved ones."""

    low: int = DEFAULT_EPHEMERAL[0]
    high: int = DEFAULT_EPHEMERAL[1]
    reserved: frozenset[int] = frozenset()

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high and port not in self.reserved


def _parse_range(text: str) -> tuple[int, int] | None:
    parts = text.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    low, high = int(parts[0]), int(parts[1])
    return (low, high) if 0 < low <= high <= 65535 else None


def _parse_reserved(text: str) -> frozenset[int]:
    """``ip_local_reserved_ports``: "8080,9000-9010" (empty when none). Malformed items are
    skipped: a port wrongly left reserved only makes the watch more sensitive."""
    ports: set[int] = set()
    for item in text.strip().split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            continue
        first, last = int(low), int(high or low)
        ports.update(range(first, min(last, 65535) + 1))
    return frozenset(ports)


def _ports(span: bytes | None, reserved: bytes | None) -> EphemeralPorts:
    parsed = None if span is None else _parse_range(span.decode(errors="replace"))
    low, high = parsed or DEFAULT_EPHEMERAL
    held = frozenset() if reserved is None else _parse_reserved(reserved.decode(errors="replace"))
    return EphemeralPorts(low, high, held)


def ephemeral_ports(root: Path) -> EphemeralPorts:
    """The host's ephemeral port range; the kernel default when it cannot be read."""
    return _ports(_read(os.path.join(root, PORT_RANGE)), _read(os.path.join(root, RESERVED_PORTS)))


def _service_listeners(data: bytes, ephemeral: EphemeralPorts) -> bytes:
    """The local addresses of LISTEN rows of /proc/net/tcp{,6}, less ephemeral ports; only
    LISTEN rows, as queues and timers change all the time."""
    rows = []
    for line in data.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == b"0A":  # TCP_LISTEN
            rows.append(parts[1])
    return _services(rows, ephemeral)


def _services(rows: list[bytes], ephemeral: EphemeralPorts) -> bytes:
    """Listening addresses (``ADDRESS:PORT``, hex) less ephemeral ports, sorted."""
    kept = []
    for row in rows:
        _, _, port = row.rpartition(b":")
        try:
            if int(port, 16) in ephemeral:
                continue
        except ValueError:
            pass  # an unparsable row counts: better a spurious change than a missed one
        kept.append(row)
    return b"\n".join(sorted(kept))


def _read(path: str) -> bytes | None:
    """The file's bytes; None when it cannot be read (a directory raises IsADirectoryError,
    for the caller). One read when the file is shorter than the buffer (a short read is the
    end, for regular files and the kernel's seq files alike); pseudo files report a size of
    0 or 4096 whatever they hold, so the size is not asked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except IsADirectoryError:
        raise
    except OSError:
        return None
    try:
        data = os.read(fd, _CHUNK)
        if len(data) < _CHUNK:
            return data
        chunks = [data]
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    except IsADirectoryError:
        raise
    except OSError:
        return None
    finally:
        os.close(fd)


_CHUNK = 65536


def _digest_dir(path: str) -> bytes:
    """A directory's entries, each name with its content's digest (a renamed Include file
    changes sshd's reading order, so names count)."""
    digest = hashlib.sha256()
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return b"-"
    for name in names:
        digest.update(name.encode(errors="surrogateescape") + b"\0")
        digest.update(_digest(os.path.join(path, name)) + b"\0")
    return digest.digest()


def _digest(path: str, *, listening: EphemeralPorts | None = None) -> bytes:
    try:
        data = _read(path)
    except IsADirectoryError:
        return _digest_dir(path)
    return _digest_data(data, listening)


def _digest_data(data: bytes | None, listening: EphemeralPorts | None = None) -> bytes:
    if data is None:
        return b"-"
    if listening is not None:
        data = _service_listeners(data, listening)
    return hashlib.sha256(data).digest()


def _raw(path: str) -> bytes | str | None:
    """The file's bytes, None when unreadable, or the path itself for a directory."""
    try:
        return _read(path)
    except IsADirectoryError:
        return path


class Fingerprinter:
    """Fingerprints of ``signals`` under ``root``: one digest per signal; a signal changed
    when its digest did. Paths are joined once, here. On the host itself (``root`` is /),
    listeners come from sock_diag (``netlink.SockDiag``) where the kernel offers it: the
    same rows as /proc/net/tcp{,6}'s LISTEN rows, without the kernel printing every
    connection."""

    def __init__(self, root: Path, signals: Iterable[str] | None = None) -> None:
        chosen = list(WATCHED) if signals is None else list(signals)
        base = os.fspath(root)
        self.signals = tuple(chosen)
        self._paths = {s: [os.path.join(base, rel) for rel in WATCHED[s]] for s in chosen}
        self._ports = (os.path.join(base, PORT_RANGE), os.path.join(base, RESERVED_PORTS))
        self._listening = "listening_sockets" in chosen
        self.diag: SockDiag | None = None
        if self._listening and os.path.realpath(base) == "/":
            try:
                self.diag = SockDiag()
            except OSError as exc:
                logger.info("sock_diag unavailable (%s): reading /proc/net/tcp", exc)

    def __call__(self) -> dict[str, bytes]:
        """Each file read once, however many signals need it."""
        raw: dict[str, bytes | str | None] = {}

        def data(path: str) -> bytes | str | None:
            if path not in raw:
                raw[path] = _raw(path)
            return raw[path]

        ephemeral = None
        if self._listening:
            span, reserved = (data(p) for p in self._ports)
            ephemeral = _ports(
                span if isinstance(span, bytes) else None,
                reserved if isinstance(reserved, bytes) else None,
            )
        out = {}
        for signal, paths in self._paths.items():
            if signal == "listening_sockets":
                assert ephemeral is not None
                out[signal] = self._listeners(paths, ephemeral)
                continue
            parts = []
            for path in paths:
                content = data(path)
                parts.append(
                    _digest_dir(content) if isinstance(content, str) else _digest_data(content)
                )
            out[signal] = b"".join(parts)
        return out

    def close(self) -> None:
        if self.diag is not None:
            self.diag.close()
            self.diag = None

    def _listeners(self, paths: list[str], ephemeral: EphemeralPorts) -> bytes:
        if self.diag is not None:
            try:
                return b"".join(
                    hashlib.sha256(_services(self.diag.listening(family), ephemeral)).digest()
                    for family in (socket.AF_INET, socket.AF_INET6)
                )
            except OSError as exc:
                logger.warning("sock_diag failed (%s): reading /proc/net/tcp from now on", exc)
                self.diag.close()
                self.diag = None
        return b"".join(_digest(path, listening=ephemeral) for path in paths)


def fingerprint(root: Path, signals: Iterable[str] | None = None) -> dict[str, bytes]:
    """One digest per watched signal (``signals``: only these); a signal changed when its
    digest did."""
    fingerprinter = Fingerprinter(root, signals)
    try:
        return fingerprinter()
    finally:
        fingerprinter.close()


class Debouncer:
    """Turns posture changes seen at poll times into PostureChanged notes (pure: the caller
    passes its monotonic clock's ``now``).

    The first change after a quiet window is sent at once and opens a window of
    ``window_s``; changes within it are held and sent, as one note with the union of their
    signals, when it closes (``due``), which opens the next window. So at most one note per
    window leaves the agent however often the host churns, and a lone change is never
    delayed.
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError("the debounce window must be positive")
        self._window = window_s
        self._until: float | None = None
        self._held: set[str] = set()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    @property
    def closes_at(self) -> float | None:
        """When the open window closes (on the caller's clock); None when none is open."""
        return self._until

    def changed(self, signals: list[str], now: float) -> list[str] | None:
        """Signals that changed at ``now``: what to send now, or None when they are held."""
        if not signals:
            return self.due(now)
        if self._until is not None and now < self._until:
            self._held.update(signals)
            return None
        return self._send(set(signals), now)

    def due(self, now: float) -> list[str] | None:
        """The held signals once their window has closed, else None."""
        if self._until is None or now < self._until:
            return None
        if not self._held:
            self._until = None  # quiet: the next change goes at once
            return None
        return self._send(set(), now)

    def _send(self, signals: set[str], now: float) -> list[str]:
        out = sorted(self._held | signals)
        self._held.clear()
        self._until = now + self._window
        return out
