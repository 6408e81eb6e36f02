"""What the parent of N workers tells systemd for them (verifier/workers.py ``Supervisor``):
the STATUS= line summing the state each worker last reported, and the reload around SIGHUP
(RELOADING=1, then READY=1 once every serving worker said how its reload went, or after
RELOAD_WAIT_S). Driven by messages (a worker's report, a worker gone, a SIGHUP, the stop):
no process, pipe or signal here, so that its bookkeeping is tested alone
(tests/test_service_state.py). Also the watchdog's two intervals for the workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from devtrust.core.sdnotify import Notifier
from devtrust.verifier.running import ServingState, status_line
from devtrust.verifier.serving import STATUS_REFRESH_S

# After a SIGHUP, the parent says READY=1 once every worker said how its reload went, or
# after this long (a worker that died meanwhile must not leave systemd "reloading").
RELOAD_WAIT_S = 30.0
# A worker silent this long at least is stuck, whatever WatchdogSec= says: a WatchdogSec=2s
# must not kill workers (SIGKILL, no drain) over a two-second stall.
SILENT_FLOOR_S = 10.0


class Cancellable(Protocol):
    def cancel(self) -> None: ...


# Runs a callback after a delay (the event loop's call_later, by default).
Later = Callable[[float, Callable[[], None]], Cancellable]


def watch_intervals(watchdog_s: float | None) -> tuple[float | None, float]:
    """Under systemd's watchdog (``watchdog_s``; None: none): how long a worker may be silent
    before it is killed (None: never), and how often each worker reports (its heartbeat):
    every STATUS_REFRESH_S, or half the watchdog's interval if shorter; silent for the
    watchdog's interval, but at least SILENT_FLOOR_S."""
    if watchdog_s is None:
        return None, STATUS_REFRESH_S
    return max(watchdog_s, SILENT_FLOOR_S), min(STATUS_REFRESH_S, watchdog_s / 2)


class ServiceState:
    """The workers' states and the reload in progress, as told to ``notifier``."""

    def __init__(self, notifier: Notifier, workers: int, *, later: Later | None = None) -> None:
        self._notifier = notifier
        self._workers = workers
        self._later = later
        self.states: dict[int, ServingState] = {}
        # The workers a SIGHUP's reload waits for, each with its answer (None: not yet).
        self.reloading: dict[int, str | None] = {}
        self._timer: Cancellable | None = None
        self._told_at = 0.0
        self.stopped = False

    def status(self) -> str:
        """The STATUS= line: the workers' states summed."""
        return status_line([self.states[i] for i in sorted(self.states)], workers=self._workers)

    def stopping(self, line: str) -> None:
        """STOPPING=1 (once); a reload that ends afterwards says no READY=1."""
        if not self.stopped:
            self._notifier.stopping(line)
        self.stopped = True

    def reload(self, serving: Iterable[int]) -> None:
        """SIGHUP: RELOADING=1; READY=1 once each of the ``serving`` workers (indexes) said
        how its reload went, or after RELOAD_WAIT_S, or now when there is none."""
        self._notifier.reloading("reloading the policy in every worker (SIGHUP)")
        self.reloading = dict.fromkeys(serving)
        if self._timer is not None:
            self._timer.cancel()
        later = self._later or asyncio.get_running_loop().call_later
        self._timer = later(RELOAD_WAIT_S, self.reloaded)
        if not self.reloading:
            self.reloaded()

    def reloaded(self) -> None:
        """READY=1 after a reload, with what the workers said (or that some said nothing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        said = sorted({line for line in self.reloading.values() if line is not None})
        silent = sum(1 for line in self.reloading.values() if line is None)
        self.reloading = {}
        if silent:
            said.append(f"{silent} workers did not answer within {RELOAD_WAIT_S:g} s")
        if self.stopped:  # stopping: READY=1 would say otherwise
            return
        self._notifier.ready("; ".join(said) or "reload: no worker running")

    def reported(self, index: int, what: object, now: float) -> None:
        """Worker ``index``'s report (serving.Tell): its state (STATUS= at once on a change
        of policy or database state, else at most every STATUS_REFRESH_S), or how its
        reload went."""
        if isinstance(what, ServingState):
            before = self.states.get(index)
            self.states[index] = what
            if not what.same_kind(before) or now - self._told_at >= STATUS_REFRESH_S:
                self._told_at = now
                self._notifier.status(self.status())
        elif isinstance(what, str) and index in self.reloading:
            self.reloading[index] = what
            if all(line is not None for line in self.reloading.values()):
                self.reloaded()

    def gone(self, index: int) -> None:
        """Worker ``index`` gone: its state no longer counts, nor its answer to a reload."""
        self.states.pop(index, None)
        if self.reloading.pop(index, "") is None and all(
            line is not None for line in self.reloading.values()
        ):
            self.reloaded()
