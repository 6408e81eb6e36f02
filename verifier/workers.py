"""One verifier, several worker processes (issue 11, item 3: both cores).

``devtrust-verifier serve --workers N`` (or ``server.workers`` in the configuration) runs a
parent that serves nothing itself, and N workers, each a whole verifier (both gRPC servers,
the attestation streams, the Query API) binding the same two addresses with SO_REUSEPORT: the
kernel spreads new connections over them, and an agent's stream stays on the worker its
connection reached. Why this and not a port each behind one address: agents and operators
keep one address, no proxy hop is added, and a worker that dies loses only its own
connections, whose agents reconnect to the others at once.

The parent, before any worker starts:
- checks each address as the single process does (nothing else may hold the port: a second
  verifier would otherwise join the group silently, issue 8), then holds it with a bound,
  never listening, SO_REUSEPORT socket: a port 0 becomes a concrete free port that every
  worker binds, and the port stays this verifier's while a worker restarts;
- opens the database once (checked, migrated), so the workers open it migrated.
Then it starts worker 0, and the others once it serves (a mistake in the configuration is
reported once, as by the single process, exit 2). It supervises: a worker that dies is
started again after a backoff (0.5 s doubling to 10 s, reset once a worker served a
minute); SIGTERM and SIGINT are passed to every worker, which drains as the single process
does (server.drain_s), and the parent waits for them (killing one still running past the
drain and a margin); SIGHUP is passed to each (each reloads its policy files and publishes
them). A worker whose parent dies stops too (the pipe between them closes).

What the workers share goes through the database (verifier/storage/sqlite_changes.py):
revocations, the devices revoked or moved, the trust watch's changes, each device's stream
lease. Logs: every worker's lines carry ``workerN[pid]`` (in JSON, ``worker`` and ``pid``).

Under systemd (``Type=notify``, ``NotifyAccess=main``) the parent is the main PID and speaks
for all (protos/devtrust/core/sdnotify.py): READY=1 once every worker serves, STATUS= summing
what each worker reports over its pipe (streams, policy, database state), WATCHDOG=1 from
its own loop, RELOADING=1 on SIGHUP and READY=1 once each worker said how its reload went,
STOPPING=1. The workers inherit no NOTIFY_SOCKET. The single process does the same itself
(``serve_until_signalled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from devtrust.core.command import one_line
from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.core.logsetup import configure_logging, formatter
from devtrust.core.sdnotify import Notifier, start_watchdog
from devtrust.verifier.config import VerifierConfig, parse_address
from devtrust.verifier.listen import bind_problem
from devtrust.verifier.metrics_workers import WorkerMetrics
from devtrust.verifier.policy import PolicyError
from devtrust.verifier.policy_store import SIGHUP_ACTOR
from devtrust.verifier.running import ServingState, status_line
from devtrust.verifier.server import RunningVerifier, WorkerPlace, start_verifier
from devtrust.verifier.storage import open_repositories
from devtrust.verifier.store_health import is_outage

logger = logging.getLogger("devtrust.verifier.workers")
# Restart backoff: first delay, cap; a worker that served this long starts the count again.
BACKOFF_S = (0.5, 10.0)
HEALTHY_S = 60.0
# A worker drains within server.drain_s (its streams ended after their decisions in flight,
# unary calls finished, RunningVerifier.drain), and exits within this margin after, or is
# killed. STOP_GRACE_S bounds a worker that failed to start.
STOP_GRACE_S = 2.0
STOP_MARGIN_S = 10.0
# A process still running this long after its drain's bound exits anyway (_exit_after).
EXIT_MARGIN_S = 5.0
_READY = "ready"
_FAILED = "failed"


# --- serving until told to stop: the single process and each worker ------------------------

# How often a process looks at its state for STATUS= (a change of policy or of the database's
# state is told within this), and how often the line is sent anyway (the stream count).
STATUS_CHECK_S = 1.0
STATUS_REFRESH_S = 10.0
# After a SIGHUP, the parent says READY=1 once every worker said how its reload went, or
# after this long (a worker that died meanwhile must not leave systemd "reloading").
RELOAD_WAIT_S = 30.0

# What a process tells about itself: its state for STATUS= (``ServingState``), or how a
# SIGHUP's reload went (a line). The single process tells systemd (``_Systemd``); a worker,
# its parent, over the pipe between them (``_ToParent``).
Tell = Callable[[ServingState | str], None]


def _to_systemd(notifier: Notifier) -> Tell:
    """The single process: its state as STATUS=, a reload's outcome as READY=1 with it."""

    def tell(what: ServingState | str) -> None:
        if isinstance(what, str):
            notifier.ready(what)
        else:
            notifier.status(status_line([what]))

    return tell


async def serve_until_signalled(
    running: RunningVerifier,
    *,
    stopped: asyncio.Event | None = None,
    notifier: Notifier | None = None,
    tell: Tell | None = None,
    refresh_s: float = STATUS_REFRESH_S,
) -> None:
    """Serve until SIGTERM or SIGINT (or ``stopped``), then drain (server.drain_s): SIGHUP
    reloads the policy files and publishes them to the database.

    ``notifier``: this is the process systemd started (one process, no workers): READY=1
    now, STATUS= with ``running``'s state (on each change of policy or database state, and
    every STATUS_REFRESH_S), WATCHDOG=1 from this loop, RELOADING=1 and READY=1 around a
    SIGHUP's reload, STOPPING=1 on SIGTERM. ``tell``: a worker's report to its parent, at
    least every ``refresh_s`` (its heartbeat: the parent kills a worker that falls silent)."""
    stop = stopped or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if notifier is not None:
        tell = _to_systemd(notifier)
        notifier.ready(status_line([running.state()]))
    background = [asyncio.create_task(_report_state(running, tell, refresh_s))] if tell else []
    if notifier is not None and (ping := start_watchdog(notifier)) is not None:
        background.append(ping)
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        outcome = await reload_policy(running)
        if tell is not None:
            tell(outcome)

    def on_sighup() -> None:
        if notifier is not None:
            notifier.reloading("reloading the policy (SIGHUP)")
        task = asyncio.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    logger.info("stopping: draining within %g s", running.drain_s)
    if notifier is not None:
        notifier.stopping(
            f"stopping: draining {running.attestation.open_streams} attestation streams "
            f"within {running.drain_s:g} s"
        )
    watchdog = _exit_after(running.drain_s + EXIT_MARGIN_S)
    try:
        await running.drain()
    finally:
        watchdog.cancel()
        for task in background:
            task.cancel()


async def _report_state(running: RunningVerifier, tell: Tell, refresh_s: float) -> None:
    """``running``'s state, told now, on each change of policy or database state (looked
    at every STATUS_CHECK_S or ``refresh_s`` if sooner) and every ``refresh_s``."""
    loop = asyncio.get_running_loop()
    told: ServingState | None = None
    told_at = 0.0
    while True:
        state = running.state()
        if not state.same_kind(told) or loop.time() - told_at >= refresh_s:
            tell(state)
            told, told_at = state, loop.time()
        await asyncio.sleep(min(STATUS_CHECK_S, refresh_s))


def _exit_after(limit_s: float) -> threading.Timer:
    """A drain that hangs (a task that ignores cancellation, a thread stuck in a database
    call) does not keep the process: a daemon timer ends it after ``limit_s``, exit status
    1, unless cancelled first."""

    def expire() -> None:
        logger.error("did not stop within %g s of SIGTERM: exiting anyway", limit_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    timer.start()
    return timer


async def reload_policy(running: RunningVerifier) -> str:
    """SIGHUP: this process's policy files, loaded and published (the other processes and
    replicas follow); a policy that does not load, or a database that does not take it,
    leaves the old one in force, said in the log. What happened, in a line for STATUS=."""
    try:
        if running.shared_policy is not None:
            policy = await running.shared_policy.reload(actor=SIGHUP_ACTOR)
        else:
            policy = running.policy.reload()
    except PolicyError as exc:
        logger.error("SIGHUP: policy refused, the old one stays: %s", exc)  # noqa: TRY400
        return f"reload: policy refused, {_in_force(running)} stays: {exc}"
    except Exception as exc:
        if not is_outage(exc):
            raise
        logger.error("SIGHUP: the database did not take the policy, the old one stays: %s", exc)  # noqa: TRY400
        return f"reload: the database did not take the policy, {_in_force(running)} stays"
    if policy is None:
        return "reload: no policy configured (policy: in the configuration), nothing loaded"
    logger.info("SIGHUP: policy %s loaded (%d rules)", policy.policy_id, len(policy.rules))
    return f"reload: policy {policy.policy_id} loaded ({len(policy.rules)} rules)"


def _in_force(running: RunningVerifier) -> str:
    current = running.policy.current
    return "no policy" if current is None else f"policy {current.policy_id}"


# --- the parent: ports, database, workers -----------------------------------------------------


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _hold(address: str, key: str) -> tuple[str, socket.socket]:
    """Check ``address`` as the single process does, then hold it (a bound SO_REUSEPORT
    socket that never listens): the concrete address every worker binds, and the socket."""
    problem = bind_problem(address, key)
    if problem is not None:
        raise ConfigError(f"cannot listen on {address} ({key}): {problem}")
    host, port = parse_address(address)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {address} ({key}): {exc.strerror or exc}: change `{key}:` "
            "in the configuration"
        ) from exc
    return _address(host, int(sock.getsockname()[1])), sock


def hold_ports(config: VerifierConfig) -> tuple[VerifierConfig, list[socket.socket]]:
    """The configuration with concrete ports (a port 0 resolved), and the sockets holding
    them for as long as the workers run."""
    held: list[socket.socket] = []
    try:
        enrollment, sock = _hold(config.listen.enrollment, "listen.enrollment")
        held.append(sock)
        attestation, sock = _hold(config.listen.attestation, "listen.attestation")
        held.append(sock)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    listen = replace(config.listen, enrollment=enrollment, attestation=attestation)
    return replace(config, listen=listen), held


@dataclass
class _Worker:
    place: WorkerPlace
    process: BaseProcess | None = None
    conn: Connection | None = None
    # Done once the process exited (its sentinel became readable).
    exited: asyncio.Future[None] | None = None
    restarts: int = 0
    failures: int = 0
    pids: list[int] = field(default_factory=list)
    # When the parent last heard from it (loop time; None: not serving yet, or gone).
    heard: float | None = None

    async def ended(self, within_s: float | None) -> bool:
        """Wait until the process exits, at most ``within_s``; whether it did."""
        if self.exited is None or self.process is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), within_s)
        except TimeoutError:
            return False
        self.process.join(1.0)
        return True


class Supervisor:
    """The parent of ``count`` workers serving ``config`` (its ports concrete and held)."""

    def __init__(
        self,
        config: VerifierConfig,
        count: int,
        *,
        level: int = logging.INFO,
        log_format: str = "text",
        backoff_s: tuple[float, float] = BACKOFF_S,
        notifier: Notifier | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._config = config
        self._count = count
        self._level = level
        self._log_format = log_format
        self._backoff_s = backoff_s
        # Told each worker pid that exited (the metrics endpoint drops its live gauges).
        self._on_exit = on_exit
        self._context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(WorkerPlace(i, count)) for i in range(count)]
        self._stop = asyncio.Event()
        # systemd's notifications (the parent is the main PID; workers send none): the state
        # each worker last told, and the workers a SIGHUP's reload still waits for.
        self._notifier = notifier or Notifier(None)
        self._states: dict[int, ServingState] = {}
        self._reloading: dict[int, str | None] = {}
        self._reload_timer: asyncio.TimerHandle | None = None
        self._told_at = 0.0
        # Under systemd's watchdog, the workers' loops are watched too: each reports at
        # least every ``heartbeat_s``; one silent for the watchdog's interval is stuck, and
        # is killed (then started again, as any worker that dies).
        watchdog_s = self._notifier.watchdog_s
        self._silent_s = watchdog_s
        self._heartbeat_s = (
            STATUS_REFRESH_S if watchdog_s is None else min(STATUS_REFRESH_S, watchdog_s / 2)
        )

    @property
    def pids(self) -> list[int]:
        """The pid of each worker now (0: none running)."""
        return [(w.process.pid or 0) if w.process is not None else 0 for w in self._workers]

    def stop(self) -> None:
        if not self._stop.is_set():
            self._notifier.stopping(
                f"stopping: {self._count} workers draining within {self._config.server.drain_s:g} s"
            )
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: RELOADING=1, every worker told to reload; READY=1 once each said how it
        went (``_on_message``), or after RELOAD_WAIT_S."""
        self._notifier.reloading("reloading the policy in every worker (SIGHUP)")
        live = [w for w in self._workers if w.conn is not None]
        self._reloading = {w.place.index: None for w in live}
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        self._reload_timer = asyncio.get_running_loop().call_later(RELOAD_WAIT_S, self._reloaded)
        self.signal_all(signal.SIGHUP)
        if not live:
            self._reloaded()

    def _reloaded(self) -> None:
        """READY=1 after a reload, with what the workers said (or that some said nothing)."""
        if self._reload_timer is not None:
            self._reload_timer.cancel()
            self._reload_timer = None
        said = sorted({line for line in self._reloading.values() if line is not None})
        silent = sum(1 for line in self._reloading.values() if line is None)
        self._reloading = {}
        if silent:
            said.append(f"{silent} workers did not answer within {RELOAD_WAIT_S:g} s")
        if self._stop.is_set():  # stopping: READY=1 would say otherwise
            return
        self._notifier.ready("; ".join(said) or "reload: no worker running")

    def status(self) -> str:
        """The STATUS= line: the workers' states summed."""
        return status_line([self._states[i] for i in sorted(self._states)], workers=self._count)

    def _on_message(self, worker: _Worker, what: object) -> None:
        """A worker's report (``Tell``): its state, or how its reload went."""
        worker.heard = asyncio.get_running_loop().time()
        index = worker.place.index
        if isinstance(what, ServingState):
            before = self._states.get(index)
            self._states[index] = what
            now = asyncio.get_running_loop().time()
            if not what.same_kind(before) or now - self._told_at >= STATUS_REFRESH_S:
                self._told_at = now
                self._notifier.status(self.status())
        elif isinstance(what, str) and index in self._reloading:
            self._reloading[index] = what
            if all(line is not None for line in self._reloading.values()):
                self._reloaded()

    def _listen(self, worker: _Worker) -> None:
        """Read the worker's reports as they come, until its end of the pipe closes."""
        conn = worker.conn
        assert conn is not None
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                what = conn.recv()
            except (EOFError, OSError):
                loop.remove_reader(conn.fileno())
                self._forget(worker)
                return
            self._on_message(worker, what)

        worker.heard = loop.time()
        loop.add_reader(conn.fileno(), readable)

    def _forget(self, worker: _Worker) -> None:
        """A worker gone: its state no longer counts, nor its answer to a reload."""
        worker.heard = None
        self._states.pop(worker.place.index, None)
        if self._reloading.pop(worker.place.index, "") is None and all(
            line is not None for line in self._reloading.values()
        ):
            self._reloaded()

    def _close(self, worker: _Worker) -> None:
        if worker.conn is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.conn.close()
            worker.conn = None
        self._forget(worker)

    def signal_all(self, sig: int) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    async def start(self) -> None:
        """Worker 0 serving, then the others: a mistake every worker would make is
        reported once (ConfigError with the worker's message), and nothing is left running."""
        try:
            await self._spawn(self._workers[0])
            await asyncio.gather(*(self._spawn(w) for w in self._workers[1:]))
        except BaseException:
            await self.shutdown()
            raise

    async def supervise(self) -> None:
        """Keep every worker running until ``stop``; then stop them all."""
        try:
            await asyncio.gather(*(self._keep(w) for w in self._workers), self._watch())
        finally:
            await self.shutdown()

    async def _watch(self) -> None:
        """Under systemd's watchdog: kill a worker whose loop fell silent (``_keep`` starts
        it again). Its own watchdog pings say only that the parent's loop turns."""
        if self._silent_s is None:
            return
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._heartbeat_s)
            if self._stop.is_set():
                return
            for worker in self._workers:
                process = worker.process
                if worker.heard is None or process is None or process.exitcode is not None:
                    continue
                if loop.time() - worker.heard > self._silent_s:
                    logger.error(
                        "%s (pid %s) sent nothing for %g s: its event loop is stuck, killed",
                        worker.place.name,
                        process.pid,
                        self._silent_s,
                    )
                    worker.heard = None
                    process.kill()

    async def shutdown(self) -> None:
        """SIGTERM to every worker (each drains); those still running after the drain and a
        margin are killed."""
        self.signal_all(signal.SIGTERM)
        limit = max(STOP_GRACE_S, self._config.server.drain_s) + STOP_MARGIN_S
        deadline = asyncio.get_running_loop().time() + limit
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            left = deadline - asyncio.get_running_loop().time()
            if not await worker.ended(max(0.0, left)):
                logger.error(
                    "%s (pid %s) did not stop in time: killed", worker.place.name, process.pid
                )
                process.kill()
                await worker.ended(5.0)
            self._close(worker)

    async def _spawn(self, worker: _Worker) -> None:
        """Start the worker and wait until it serves; ConfigError with its message when it
        could not start."""
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(self._config, worker.place, theirs, self._level),
            kwargs={"log_format": self._log_format, "heartbeat_s": self._heartbeat_s},
            name=f"devtrust-verifier {worker.place.name}",
        )
        process.start()
        theirs.close()  # the worker's end: its exit closes the pipe
        worker.process, worker.conn = process, ours
        worker.exited = _exit_of(process)
        message = await asyncio.get_running_loop().run_in_executor(None, _receive, ours)
        if message is None or message[0] != _READY:
            await worker.ended(STOP_GRACE_S + STOP_MARGIN_S)
            why = message[1] if message is not None else f"it exited ({process.exitcode})"
            raise ConfigError(f"{worker.place.name} did not start: {why}")
        worker.pids.append(process.pid or 0)
        self._listen(worker)

    async def _keep(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            process = worker.process
            assert process is not None
            started = loop.time()
            stopping = asyncio.ensure_future(self._stop.wait())
            ended = asyncio.ensure_future(worker.ended(None))
            await asyncio.wait({stopping, ended}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            ended.cancel()
            if self._stop.is_set():
                return
            if self._on_exit is not None and process.pid is not None:
                self._on_exit(process.pid)
            worker.failures = 1 if loop.time() - started >= HEALTHY_S else worker.failures + 1
            first, cap = self._backoff_s
            delay = min(cap, first * 2 ** (worker.failures - 1))
            logger.error(
                "%s (pid %s) exited (%s): started again in %.1f s",
                worker.place.name,
                process.pid,
                _exit_text(process.exitcode),
                delay,
            )
            self._close(worker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                await self._spawn(worker)
            except ConfigError as exc:
                logger.error("%s", exc)  # noqa: TRY400 (its message says it all)
                continue
            worker.restarts += 1
            logger.info("%s started again (pid %s)", worker.place.name, worker.pids[-1])


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _receive(conn: Connection) -> tuple[str, str] | None:
    try:
        message = conn.recv()
    except (EOFError, OSError):
        return None
    return (str(message[0]), str(message[1]))


def _exit_of(process: BaseProcess) -> asyncio.Future[None]:
    """Done once ``process`` exits: its sentinel watched by the loop, once."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    fd = process.sentinel

    def ready() -> None:
        loop.remove_reader(fd)
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, ready)
    return exited


async def supervise(
    config: VerifierConfig,
    count: int,
    *,
    level: int = logging.INFO,
    log_format: str = "text",
    notifier: Notifier | None = None,
) -> None:
    """`serve` with ``count`` workers, until SIGTERM or SIGINT. ``notifier``: systemd's
    (this parent is the main PID): READY=1 once every worker serves, STATUS= with their
    summed state, WATCHDOG=1 from this loop, RELOADING=1/READY=1 around SIGHUP, STOPPING=1."""
    concrete, held = hold_ports(config)
    ping: asyncio.Task[None] | None = None
    metrics: WorkerMetrics | None = None
    try:
        # Checked and migrated once, here: the workers open it migrated.
        repos = await open_repositories(concrete.database)
        await repos.close()
        # One metrics endpoint, here, over every worker's (verifier/metrics_workers.py):
        # before the first worker starts, which inherits where to write its values.
        metrics = WorkerMetrics.open(concrete, count)
        supervisor = Supervisor(
            concrete,
            count,
            level=level,
            log_format=log_format,
            notifier=notifier,
            on_exit=None if metrics is None else metrics.worker_exited,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.stop)
        loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
        # Pinging while the workers start: systemd's start timeout bounds the start, the
        # watchdog a wedged loop.
        ping = None if notifier is None else start_watchdog(notifier)
        await supervisor.start()
        if notifier is not None:
            notifier.ready(supervisor.status())
        logger.info(
            "verifier listening: enrollment (TLS) on %s, attestation+query (mTLS) on %s, "
            "database %s, %d workers (pids %s)",
            parse_address(concrete.listen.enrollment)[1],
            parse_address(concrete.listen.attestation)[1],
            concrete.database,
            count,
            " ".join(str(pid) for pid in supervisor.pids),
        )
        await supervisor.supervise()
        logger.info("stopped")
    finally:
        if ping is not None:
            ping.cancel()
        if metrics is not None:
            await metrics.aclose()
        for sock in held:
            sock.close()


# --- a worker ---------------------------------------------------------------------------------


def worker_main(
    config: VerifierConfig,
    place: WorkerPlace,
    conn: Connection,
    level: int,
    *,
    log_format: str = "text",
    heartbeat_s: float = STATUS_REFRESH_S,
) -> None:
    """A worker process's body (multiprocessing, spawn): serve until told to stop, or until
    the parent is gone."""
    configure_logging(level)
    fmt = f"%(asctime)s %(levelname)s {place.name}[%(process)d] %(name)s: %(message)s"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            formatter(log_format, text=fmt, fields={"worker": place.name, "pid": os.getpid()})
        )
    try:
        asyncio.run(_work(config, place, conn, heartbeat_s))
    except (DevtrustError, OSError) as exc:
        with contextlib.suppress(OSError):
            conn.send((_FAILED, one_line(exc)))
        sys.exit(2)


async def _work(
    config: VerifierConfig, place: WorkerPlace, conn: Connection, heartbeat_s: float
) -> None:
    running = await start_verifier(config, worker=place)
    conn.send((_READY, str(os.getpid())))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The parent's end closes when it exits (even killed): this worker stops then.
    loop.add_reader(conn.fileno(), _on_parent(conn, stop.set))

    def tell(what: ServingState | str) -> None:
        with contextlib.suppress(OSError, ValueError):  # the parent gone: stopping anyway
            conn.send(what)

    try:
        await serve_until_signalled(running, stopped=stop, tell=tell, refresh_s=heartbeat_s)
    finally:
        loop.remove_reader(conn.fileno())


def _on_parent(conn: Connection, stop: Callable[[], None]) -> Callable[[], None]:
    def readable() -> None:
        try:
            conn.recv()
        except (EOFError, OSError):
            logger.warning("the verifier's parent process is gone: stopping")
            stop()

    return readable
