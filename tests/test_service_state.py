"""The parent's systemd bookkeeping for its workers (verifier/service_state.py), alone: the
STATUS= line, RELOADING=1 then READY=1 once every serving worker answered (or a worker gone,
or the wait over), nothing after STOPPING=1, and the watchdog's intervals with their floor.
No process: the notifier records what would be sent, the timer is a list."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from devtrust.core.sdnotify import Notifier
from devtrust.verifier.running import ServingState
from devtrust.verifier.service_state import (
    RELOAD_WAIT_S,
    SILENT_FLOOR_S,
    ServiceState,
    watch_intervals,
)

UP = ServingState(streams=3, policy="p1", store_up=True)


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict[str, str]] = []

    def send(self, *assignments: tuple[str, str]) -> bool:
        self.sent.append(dict(assignments))
        return True

    def keys(self) -> list[str]:
        return [next(iter(m)) for m in self.sent]


class Timers:
    """``later`` that runs nothing by itself: the test fires what is pending."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None], list[bool]]] = []

    def later(self, delay: float, callback: Callable[[], None]) -> Timers.Handle:
        cancelled = [False]
        self.pending.append((delay, callback, cancelled))
        return Timers.Handle(cancelled)

    def fire(self) -> None:
        for _, callback, cancelled in self.pending:
            if not cancelled[0]:
                callback()

    class Handle:
        def __init__(self, cancelled: list[bool]) -> None:
            self._cancelled = cancelled

        def cancel(self) -> None:
            self._cancelled[0] = True


@pytest.fixture
def notifier() -> Recorder:
    return Recorder()


@pytest.fixture
def timers() -> Timers:
    return Timers()


def test_status_sums_the_workers(notifier: Recorder) -> None:
    state = ServiceState(notifier, 2, later=Timers().later)
    assert state.status() == "serving with 2 workers: waiting for the workers' state"
    state.reported(0, UP, now=100.0)
    state.reported(1, UP, now=100.5)  # a worker's first report: told at once
    state.reported(1, UP, now=101.0)  # same kind, within STATUS_REFRESH_S: not again
    assert [m["STATUS"] for m in notifier.sent] == [
        "serving with 2 workers: 3 attestation streams, policy p1, store ok",
        "serving with 2 workers: 6 attestation streams, policy p1, store ok",
    ]
    state.reported(1, ServingState(streams=1, policy="p2", store_up=True), now=101.0)
    assert notifier.sent[-1]["STATUS"].startswith("serving with 2 workers: 4 attestation")
    state.gone(1)
    assert state.status() == "serving with 2 workers: 3 attestation streams, policy p1, store ok"


def test_reload_ready_once_every_serving_worker_answered(
    notifier: Recorder, timers: Timers
) -> None:
    state = ServiceState(notifier, 3, later=timers.later)
    state.reload([0, 2])
    assert notifier.keys() == ["RELOADING"]
    assert timers.pending[0][0] == RELOAD_WAIT_S
    state.reported(1, "reload: policy p9 loaded (1 rules)", now=1.0)  # not asked: ignored
    state.reported(0, "reload: policy p2 loaded (4 rules)", now=1.0)
    assert notifier.keys() == ["RELOADING"]
    state.reported(2, "reload: policy p2 loaded (4 rules)", now=1.0)
    assert notifier.keys() == ["RELOADING", "READY"]
    assert notifier.sent[-1]["STATUS"] == "reload: policy p2 loaded (4 rules)"
    timers.fire()  # the wait was cancelled: no second READY=1
    assert notifier.keys() == ["RELOADING", "READY"]


def test_a_worker_gone_during_a_reload_does_not_hold_it(notifier: Recorder) -> None:
    state = ServiceState(notifier, 2, later=Timers().later)
    state.reload([0, 1])
    state.reported(0, "reload: policy refused, policy p1 stays: bad", now=1.0)
    state.gone(1)
    assert notifier.keys() == ["RELOADING", "READY"]
    assert notifier.sent[-1]["STATUS"] == "reload: policy refused, policy p1 stays: bad"


def test_a_silent_worker_ends_the_wait(notifier: Recorder, timers: Timers) -> None:
    state = ServiceState(notifier, 2, later=timers.later)
    state.reload([0, 1])
    state.reported(0, "reload: policy p2 loaded (4 rules)", now=1.0)
    timers.fire()
    assert notifier.sent[-1] == {
        "READY": "1",
        "STATUS": f"reload: policy p2 loaded (4 rules); 1 workers did not answer within "
        f"{RELOAD_WAIT_S:g} s",
    }


def test_no_serving_worker_ready_at_once(notifier: Recorder) -> None:
    state = ServiceState(notifier, 2, later=Timers().later)
    state.reload([])
    assert notifier.sent[-1] == {"READY": "1", "STATUS": "reload: no worker running"}


def test_no_ready_once_stopping(notifier: Recorder) -> None:
    state = ServiceState(notifier, 1, later=Timers().later)
    state.reload([0])
    state.stopping("stopping: 1 workers draining within 10 s")
    state.stopping("again")  # once
    state.reported(0, "reload: policy p2 loaded (4 rules)", now=1.0)
    assert notifier.keys() == ["RELOADING", "STOPPING"]


@pytest.mark.parametrize(
    ("watchdog_s", "silent_s", "heartbeat_s"),
    [(None, None, 10.0), (30.0, 30.0, 10.0), (2.0, SILENT_FLOOR_S, 1.0), (120.0, 120.0, 10.0)],
)
def test_watch_intervals(
    watchdog_s: float | None, silent_s: float | None, heartbeat_s: float
) -> None:
    assert watch_intervals(watchdog_s) == (silent_s, heartbeat_s)
