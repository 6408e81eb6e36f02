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
STOPPING=1 (that bookkeeping: verifier/service_state.py). The workers inherit no
NOTIFY_SOCKET. The single process does the same itself; the loop that serves until told to
stop, shared by the single process and each worker, is verifier/serving.py.
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
from devtrust.verifier.running import ServingState, unavailable_at_start
from devtrust.verifier.server import WorkerPlace, start_verifier
from devtrust.verifier.service_state import ServiceState, watch_intervals
from devtrust.verifier.serving import STATUS_REFRESH_S, reload_policy, serve_until_signalled
from devtrust.verifier.storage import open_repositories

__all__ = [
    "Supervisor",
    "WorkerUnavailable",
    "hold_ports",
    # Moved to verifier/serving.py, still imported from here (tests/test_policy_store.py).
    "reload_policy",
    "serve_until_signalled",
    "supervise",
    "worker_main",
]
logger = logging.getLogger("devtrust.verifier.workers")
# Restart backoff: first delay, cap; a worker that served this long starts the count again.
BACKOFF_S = (0.5, 10.0)
HEALTHY_S = 60.0
# A worker drains within server.drain_s (its streams ended after their decisions in flight,
# unary calls finished, RunningVerifier.drain), and exits within this margin after, or is
# killed. STOP_GRACE_S bounds a worker that failed to start.
STOP_GRACE_S = 2.0
STOP_MARGIN_S = 10.0
# A worker not serving this long after it was started is killed (then started again, as
# any worker that dies): one that hangs in its start (a database that accepts the connection
# and answers nothing) would otherwise leave the service on N-1 workers for good, with
# STATUS= and the watchdog content. The unit's TimeoutStartSec= (120 s) bounds the first
# start anyway; this bounds every restart.
START_TIMEOUT_S = 90.0
_READY = "ready"
_FAILED = "failed"
# Why a worker did not start, sent with _FAILED: a mistake (exit 2) or a database that did
# not answer (exit 75, restarted by the unit).
_CONFIG = "config"
_OUTAGE = "outage"


class WorkerUnavailable(DevtrustError):
    """A worker did not start because the database did not answer it (or it did not start
    in START_TIMEOUT_S): the verifier exits 75 (EX_TEMPFAIL), which the unit restarts."""


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
        start_timeout_s: float = START_TIMEOUT_S,
        target: Callable[..., None] | None = None,
    ) -> None:
        self._config = config
        self._count = count
        self._level = level
        self._log_format = log_format
        self._backoff_s = backoff_s
        self._start_timeout_s = start_timeout_s
        # The worker's body: worker_main (tests give one of their own, same signature).
        self._target = target or worker_main
        # Told each worker pid that exited (the metrics endpoint drops its live gauges).
        self._on_exit = on_exit
        self._context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(WorkerPlace(i, count)) for i in range(count)]
        self._stop = asyncio.Event()
        # systemd's notifications (the parent is the main PID; workers send none): the
        # workers' states and the reload in progress (verifier/service_state.py).
        self._notifier = notifier or Notifier(None)
        self._service = ServiceState(self._notifier, count)
        # Under systemd's watchdog, the workers' loops are watched too: each reports at
        # least every ``heartbeat_s``; one silent for the watchdog's interval (at least
        # SILENT_FLOOR_S) is stuck, and is killed (then started again, as any worker that
        # dies).
        self._silent_s, self._heartbeat_s = watch_intervals(self._notifier.watchdog_s)

    @property
    def pids(self) -> list[int]:
        """The pid of each worker now (0: none running)."""
        return [(w.process.pid or 0) if w.process is not None else 0 for w in self._workers]

    def stop(self) -> None:
        self._service.stopping(
            f"stopping: {self._count} workers draining within {self._config.server.drain_s:g} s"
        )
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: RELOADING=1, every serving worker told to reload; READY=1 once each said
        how it went (``_on_message``), or after RELOAD_WAIT_S. Only workers that serve
        (heard from since READY): SIGHUP's default action ends a process, and one still
        starting has no handler yet. It loads the policy files as they are now anyway."""
        live = [w for w in self._workers if w.conn is not None and w.heard is not None]
        self._service.reload(w.place.index for w in live)
        for worker in live:
            _signal(worker, signal.SIGHUP)

    def status(self) -> str:
        """The STATUS= line: the workers' states summed."""
        return self._service.status()

    def _on_message(self, worker: _Worker, what: object) -> None:
        """A worker's report (``serving.Tell``): its state, or how its reload went."""
        worker.heard = now = asyncio.get_running_loop().time()
        self._service.reported(worker.place.index, what, now)

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
        self._service.gone(worker.place.index)

    def _close(self, worker: _Worker) -> None:
        if worker.conn is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.conn.close()
            worker.conn = None
        self._forget(worker)

    def signal_all(self, sig: int) -> None:
        for worker in self._workers:
            _signal(worker, sig)

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
        """Start the worker and wait until it serves, at most ``start_timeout_s`` (then it
        is killed); ConfigError with its message when it could not start for a mistake,
        WorkerUnavailable when the database did not answer it or it did not start in time."""
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=self._target,
            args=(self._config, worker.place, theirs, self._level),
            kwargs={"log_format": self._log_format, "heartbeat_s": self._heartbeat_s},
            name=f"devtrust-verifier {worker.place.name}",
        )
        process.start()
        theirs.close()  # the worker's end: its exit closes the pipe
        worker.process, worker.conn = process, ours
        worker.exited = _exit_of(process)
        received = asyncio.get_running_loop().run_in_executor(None, _receive, ours)
        try:
            # Shielded: the thread reading the pipe ends once the killed worker closes it.
            message = await asyncio.wait_for(asyncio.shield(received), self._start_timeout_s)
        except TimeoutError:
            process.kill()
            await worker.ended(STOP_GRACE_S + STOP_MARGIN_S)
            await received
            raise WorkerUnavailable(
                f"{worker.place.name} did not start within {self._start_timeout_s:g} s "
                "(killed): is the database answering?"
            ) from None
        if message is None or message[0] != _READY:
            await worker.ended(STOP_GRACE_S + STOP_MARGIN_S)
            why = message[1] if message is not None else f"it exited ({process.exitcode})"
            error = f"{worker.place.name} did not start: {why}"
            if message is not None and message[2] == _OUTAGE:
                raise WorkerUnavailable(error)
            raise ConfigError(error)
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
            except (ConfigError, WorkerUnavailable) as exc:
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


def _signal(worker: _Worker, sig: int) -> None:
    process = worker.process
    if process is not None and process.pid is not None and process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)


def _receive(conn: Connection) -> tuple[str, str, str] | None:
    """A starting worker's first message: (_READY, pid, "") or (_FAILED, why, kind)."""
    try:
        message = conn.recv()
    except (EOFError, OSError):
        return None
    kind = str(message[2]) if len(message) > 2 else ""
    return (str(message[0]), str(message[1]), kind)


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
    # Until serve_until_signalled handles it: a SIGHUP meant for the others must not end a
    # worker still starting (SIGHUP's default action); it loads the policy files anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(_work(config, place, conn, heartbeat_s))
    except Exception as exc:
        outage = unavailable_at_start(exc)
        if not outage and not isinstance(exc, (DevtrustError, OSError)):
            raise  # a bug: its traceback (the parent says the worker exited)
        with contextlib.suppress(OSError):
            conn.send((_FAILED, one_line(exc), _OUTAGE if outage else _CONFIG))
        sys.exit(75 if outage else 2)


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
