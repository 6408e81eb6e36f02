"""The sd_notify protocol, ours (systemd's ``sd_notify(3)``, ``sd_watchdog_enabled(3)``):
how the daemons tell systemd that they are ready, what they are doing, that they are alive,
reloading or stopping, for ``Type=notify`` units.

The protocol: each message is one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(an abstract socket when the name starts with ``@``), newline-separated ``KEY=VALUE`` lines.
Nothing is sent when the variable is unset (run by hand, under a supervisor other than
systemd, in a test that does not listen). A message that cannot be sent never raises into
the daemon: notification is advice to the service manager, not part of the work; the first
failure is logged at DEBUG, the rest silently (a watchdog pinging every few seconds into a
dead socket would otherwise fill the log).

The watchdog (``WatchdogSec=``): systemd gives ``$WATCHDOG_USEC`` and, when it may reach a
process other than the one it started, ``$WATCHDOG_PID``; we ping only when that is our pid.
``watchdog`` pings from the asyncio event loop, every half interval as sd_watchdog_enabled(3)
advises: a loop that is wedged (a blocking call on it, a deadlock) stops the pings, and
systemd kills and restarts the service. A thread that pinged would keep a dead daemon alive.

Why not the ``systemd`` Python module (python3-systemd) or sdnotify from PyPI: the protocol is
a dozen lines, the daemons run in venvs with only their role's dependencies, and neither knows
WATCHDOG_PID or the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
# systemd truncates nothing, but a STATUS= is one line of `systemctl status`: keep it short.
STATUS_MAX = 400


def socket_address(value: str | None) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names: a path, or an abstract name (``@name`` is
    ``\\0name``); None when unset, empty, or a kind we do not speak (``vsock:``, systemd 254:
    for virtual machines, not our services)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between systemd's watchdog deadlines (``WatchdogSec=``), or None when there is
    no watchdog for process ``pid``: unset, not a positive number, or ``$WATCHDOG_PID``
    naming another process (a child that inherited the environment)."""
    usec = environ.get(ENV_WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    owner = environ.get(ENV_WATCHDOG_PID)
    if owner is not None and owner != str(pid):
        return None
    return int(usec) / 1_000_000


def one_line(text: str) -> str:
    """A value for ``KEY=VALUE``: a newline would start another assignment, so whitespace
    runs become one space, and it is cut to STATUS_MAX characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= STATUS_MAX else flat[: STATUS_MAX - 3] + "..."


def message(*assignments: tuple[str, str]) -> bytes:
    """One datagram: ``KEY=VALUE`` lines (values made ``one_line``)."""
    return "\n".join(f"{key}={one_line(value)}" for key, value in assignments).encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for ``MONOTONIC_USEC=`` beside ``RELOADING=1``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to the service manager at ``address`` (None: sends nothing)."""

    def __init__(self, address: str | bytes | None, *, watchdog_s: float | None = None) -> None:
        self.address = address
        # systemd's watchdog interval for this process (None: no watchdog).
        self.watchdog_s = watchdog_s if address is not None else None
        self._failed = False
        # What was sent last as STATUS=, so that a periodic refresh can skip repeats.
        self.last_status: str | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` names, with the watchdog interval systemd gave this
        process. ``unset``: remove those variables from ``os.environ`` (as sd_notify's
        ``unset_environment``), so that processes started from here (workers) do not notify
        in our name."""
        env = os.environ if environ is None else environ
        notifier = cls(
            socket_address(env.get(ENV_SOCKET)), watchdog_s=watchdog_interval(env, os.getpid())
        )
        if unset:
            for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: tuple[str, str]) -> bool:
        """Send one message; whether it went (False also when there is nowhere to send)."""
        if self.address is None or not assignments:
            return False
        data = message(*assignments)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never blocks the event loop it is called from: a full queue (systemd busy)
                # is a failed send (EAGAIN), as any other.
                sock.sendto(data, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                logger.debug("cannot notify the service manager at %r: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup (or a reload) is done."""
        return self.send(("READY", "1"), *self._status(status))

    def status(self, text: str) -> bool:
        """STATUS=: one line that ``systemctl status`` shows."""
        return self.send(*self._status(text))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC= (systemd 253 checks it for Type=notify-reload;
        older ones ignore it): a READY=1 must follow once the reload is done."""
        return self.send(
            ("RELOADING", "1"), ("MONOTONIC_USEC", str(monotonic_usec())), *self._status(status)
        )

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown began (systemd then waits for the exit, TimeoutStopSec=)."""
        return self.send(("STOPPING", "1"), *self._status(status))

    def watchdog(self) -> bool:
        """WATCHDOG=1: alive."""
        return self.send(("WATCHDOG", "1"))

    def mainpid(self, pid: int) -> bool:
        """MAINPID=: the process systemd should watch, when it is not the one it started."""
        return self.send(("MAINPID", str(pid)))

    def _status(self, text: str | None) -> tuple[tuple[str, str], ...]:
        if text is None:
            return ()
        self.last_status = one_line(text)
        return (("STATUS", text),)


async def watchdog(notifier: Notifier, interval_s: float) -> None:
    """Ping every ``interval_s / 2`` from the event loop, until cancelled."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s / 2)


def start_watchdog(notifier: Notifier) -> asyncio.Task[None] | None:
    """The watchdog task when systemd asked for one for this process (else None); the caller
    cancels it when the loop ends."""
    if notifier.watchdog_s is None:
        return None
    logger.debug("watchdog: pinging every %g s", notifier.watchdog_s / 2)
    return asyncio.create_task(watchdog(notifier, notifier.watchdog_s), name="sd-watchdog")
