"""What ``devtrust simulate`` shows while it runs: one progress line, the agents' warnings
counted instead of printed (10,000 agents would drown a terminal), and the open-file limit a
fleet of connections needs."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator

from devtrust.core.errors import DevtrustError
from devtrust.swtpm.sim_faults import Figures


class Progress:
    """One line on stderr: rewritten in place on a terminal, else printed every 15 s."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last_print = 0.0
        self._samples: list[tuple[float, int]] = []

    def show(self, text: str, *, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif force or now - self._last_print >= 15.0:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self._last_print = now

    def done(self) -> None:
        if not self.quiet and self.tty:
            sys.stderr.write("\n")

    def rate(self, results: int) -> float:
        """Results per second over the last five seconds."""
        now = time.monotonic()
        self._samples.append((now, results))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.pop(0)
        then, before = self._samples[0]
        return (results - before) / (now - then) if now > then else 0.0


def bar(fraction: float, width: int = 24) -> str:
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class _Counting(logging.Handler):
    """Counts the agents' warnings and errors by their first words (stream failures,
    reconnects): 10,000 agents would drown a terminal in them."""

    def __init__(self, figures: Figures) -> None:
        super().__init__(logging.WARNING)
        self.figures = figures

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if ("stream" in message and "failed" in message) or "ended while sending" in message:
            # A restart or a storm ends streams: the agents reconnect, counted apart.
            self.figures.reconnects += 1
            return
        if record.levelno >= logging.ERROR:
            key = " ".join(message.split()[:4])
        else:
            # What a device is told follows from its faults (a certificate withheld or
            # revoked): the results say so; not an error of the run.
            return
        self.figures.errors[key] = self.figures.errors.get(key, 0) + 1


@contextlib.contextmanager
def counted_agent_logs(figures: Figures, *, verbose: bool) -> Iterator[None]:
    agent = logging.getLogger("devtrust.agent")
    handler = _Counting(figures)
    agent.addHandler(handler)
    propagate = agent.propagate
    agent.propagate = verbose
    try:
        yield
    finally:
        agent.removeHandler(handler)
        agent.propagate = propagate


def raise_fd_limit(devices: int) -> None:
    """Each device holds a connection, and the verifier one per device: ask for enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, devices * 2 + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < devices + 256:
        raise DevtrustError(
            f"--devices {devices} needs about {devices + 256} open files; this process may "
            f"open {hard} (ulimit -n): raise the limit or simulate fewer devices"
        )
