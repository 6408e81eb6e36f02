"""A worker's start and the parent's bookkeeping around it (review 13b M4, L3, L4, L5).

- A worker the database did not answer at its start makes `serve --workers N` exit 75 (the
  unit restarts it), not 2 (which it does not): the worker says which kind of failure it was.
- A worker that hangs before READY is killed after the start timeout (else the service runs
  on N-1 workers for good, STATUS= and the watchdog content).
- SIGHUP reaches only workers that serve: one still starting has no handler, and SIGHUP's
  default action would end it.
- A reload that raises still ends with READY=1 (else systemd stays "reloading").
- The worker's heartbeat survives an error in looking at its state.

The workers are real processes (multiprocessing, spawn) running the bodies below in place
of ``worker_main`` (same signature), so that each case is exactly what it names."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from devtrust.core.errors import ConfigError
from devtrust.core.sdnotify import Notifier
from devtrust.verifier.config import GpuConfig
from devtrust.verifier.gpu.anchors import GpuAnchorsHolder
from devtrust.verifier.main import _explain
from devtrust.verifier.running import ServingState
from devtrust.verifier.server import WorkerPlace
from devtrust.verifier.service_state import SILENT_FLOOR_S
from devtrust.verifier.serving import _report_state, reload_and_tell
from devtrust.verifier.workers import Supervisor, WorkerUnavailable, worker_main
from tests.test_sdnotify import NotifySocket

STATE = ServingState(streams=0, policy="p", store_up=True)


# --- worker bodies (module level: spawn imports them by name) -------------------------------


def outage_worker(config: Any, place: WorkerPlace, conn: Connection, level: int, **_: Any) -> None:
    """worker_main whose start meets a database that does not answer."""
    from devtrust.verifier import workers

    async def down(*_a: Any, **_k: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    workers._work = down
    worker_main(config, place, conn, level)


def config_worker(config: Any, place: WorkerPlace, conn: Connection, level: int, **_: Any) -> None:
    """worker_main whose start meets a mistake in the configuration."""
    from devtrust.verifier import workers

    async def wrong(*_a: Any, **_k: Any) -> None:
        raise ConfigError("verifier.yaml: policy: no such file")

    workers._work = wrong
    worker_main(config, place, conn, level)


def hanging_worker(config: Any, place: WorkerPlace, conn: Connection, level: int, **_: Any) -> None:
    """Never says READY (a start stuck in a database call)."""
    time.sleep(3600)


def slow_worker(config: Any, place: WorkerPlace, conn: Connection, level: int, **_: Any) -> None:
    """READY once the file named by the configuration exists; then a state every 0.1 s,
    "reloaded" on SIGHUP, until its parent is gone."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as worker_main, before its start
    gate = Path(config.gate)
    while not gate.exists():
        time.sleep(0.05)
    hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: hups.append(1))
    conn.send(("ready", str(os.getpid())))
    while True:
        if hups:
            hups.clear()
            conn.send("reload: policy p loaded (1 rules)")
        try:
            conn.send(STATE)
        except OSError:
            return
        if conn.poll(0.1):
            try:
                conn.recv()
            except EOFError:
                return


def _gate(path: str, *, is_open: bool) -> None:
    """Let slow_worker start (or hold the next one back)."""
    if is_open:
        Path(path).touch()
    else:
        Path(path).unlink()


def _config(tmp_path: Path) -> Any:
    return SimpleNamespace(server=SimpleNamespace(drain_s=1.0), gate=str(tmp_path / "gate"))


async def _start(supervisor: Supervisor) -> BaseException | None:
    try:
        await supervisor.start()
    except (ConfigError, WorkerUnavailable) as exc:
        return exc
    await supervisor.shutdown()
    return None


# --- M4 -------------------------------------------------------------------------------------


def test_a_worker_the_database_did_not_answer_exits_75(tmp_path: Path) -> None:
    supervisor = Supervisor(_config(tmp_path), 1, target=outage_worker)
    error = asyncio.run(_start(supervisor))
    assert isinstance(error, WorkerUnavailable), error
    assert "database is locked" in str(error)
    failure = _explain(error)
    assert failure is not None
    assert failure.status == 75


def test_a_worker_with_a_mistake_exits_2(tmp_path: Path) -> None:
    supervisor = Supervisor(_config(tmp_path), 1, target=config_worker)
    error = asyncio.run(_start(supervisor))
    assert isinstance(error, ConfigError), error
    assert "worker0 did not start: verifier.yaml: policy: no such file" in str(error)
    assert _explain(error) is None  # the default: exit 2


def test_a_worker_that_hangs_in_its_start_is_killed(tmp_path: Path) -> None:
    supervisor = Supervisor(_config(tmp_path), 1, target=hanging_worker, start_timeout_s=2.0)
    error = asyncio.run(_start(supervisor))
    assert isinstance(error, WorkerUnavailable), error
    assert "worker0 did not start within 2 s (killed)" in str(error)
    (pid,) = [p for p in supervisor.pids if p]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (reaped by ended)


# --- L4, L3 ---------------------------------------------------------------------------------


def test_sighup_spares_a_worker_still_starting(tmp_path: Path) -> None:
    """Worker 1 starts (it waits for ``gate``) while SIGHUP comes: only worker 0 reloads;
    worker 1 then starts as usual."""
    config = _config(tmp_path)
    gate = config.gate

    async def scenario() -> tuple[list[int], int]:
        supervisor = Supervisor(config, 2, target=slow_worker)
        _gate(gate, is_open=True)
        await supervisor._spawn(supervisor._workers[0])
        _gate(gate, is_open=False)
        starting = asyncio.create_task(supervisor._spawn(supervisor._workers[1]))
        while not supervisor.pids[1]:
            await asyncio.sleep(0.05)
        supervisor.reload()
        waiting = list(supervisor._service.reloading)
        while supervisor._service.reloading:  # worker 0 answers
            await asyncio.sleep(0.05)
        _gate(gate, is_open=True)
        await starting  # worker 1 alive: it says READY
        pid = supervisor.pids[1]
        await supervisor.shutdown()
        return waiting, pid

    waiting, pid = asyncio.run(scenario())
    assert waiting == [0]
    assert pid


def test_silence_threshold_has_a_floor() -> None:
    """WatchdogSec=2s: a worker is killed after SILENT_FLOOR_S of silence, not 2 s."""
    with NotifySocket.bound() as notify:
        address = b"\0" + notify.name[1:].encode()
        supervisor = Supervisor(
            _config(Path()),
            1,
            notifier=Notifier(address, watchdog_s=2.0),
        )
    assert supervisor._silent_s == SILENT_FLOOR_S
    assert supervisor._heartbeat_s == 1.0


# --- L5, L3's heartbeat ---------------------------------------------------------------------


def test_a_reload_that_raises_is_told(caplog: pytest.LogCaptureFixture) -> None:
    """READY=1 must follow RELOADING=1: the outcome is told even when the reload raised."""

    class Broken:
        current = SimpleNamespace(policy_id="p1")

        def reload(self) -> None:
            raise RuntimeError("boom")

    running: Any = SimpleNamespace(shared_policy=None, policy=Broken(), gpu=None)
    told: list[object] = []
    with caplog.at_level(logging.ERROR):
        asyncio.run(reload_and_tell(running, told.append))
    assert told == ["reload failed, policy p1 stays: boom"]
    assert "SIGHUP: the reload failed" in caplog.text


def test_sighup_reads_the_gpu_anchors_again_and_keeps_them_when_they_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP reads the GPU roots, RIM store and revocation data again (an operator added
    RIMs); roots that no longer load leave the old anchors in force, said in STATUS."""

    class Loaded:
        current = SimpleNamespace(policy_id="p1", rules=(1,))

        def reload(self) -> object:
            return self.current

    holder = GpuAnchorsHolder(GpuConfig(rim_store=tmp_path / "rims"))
    before = holder.current
    running: Any = SimpleNamespace(shared_policy=None, policy=Loaded(), gpu=holder)
    told: list[object] = []
    asyncio.run(reload_and_tell(running, told.append))
    assert told == ["reload: policy p1 loaded (1 rules); GPU attestation data reloaded"]
    assert holder.current is not before
    kept = holder.current
    holder.config = GpuConfig(device_roots=[tmp_path / "absent.pem"], rim_store=tmp_path)
    with caplog.at_level(logging.ERROR):
        asyncio.run(reload_and_tell(running, told.append))
    assert str(told[-1]).startswith(
        "reload: policy p1 loaded (1 rules); GPU attestation data refused, the old stay: "
        "gpu.device_roots: cannot read"
    )
    assert holder.current is kept


def test_the_heartbeat_survives_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A state that cannot be read once is logged; the next round tells it."""
    calls = 0

    def state() -> ServingState:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("not yet")
        return STATE

    running: Any = SimpleNamespace(state=state)

    async def scenario() -> list[object]:
        told: list[object] = []
        got = asyncio.Event()

        def tell(what: object) -> None:
            told.append(what)
            got.set()

        task = asyncio.create_task(_report_state(running, tell, 0.05))
        await asyncio.wait_for(got.wait(), 30)
        task.cancel()
        return told

    with caplog.at_level(logging.ERROR):
        told = asyncio.run(scenario())
    assert told == [STATE]
    assert "cannot report this process's state" in caplog.text
