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
lease. Logs: every worker's lines carry ``workerN[pid]``.
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
from devtrust.core.logsetup import IsoFormatter, configure_logging
from devtrust.verifier.config import VerifierConfig, parse_address
from devtrust.verifier.listen import bind_problem
from devtrust.verifier.policy import PolicyError
from devtrust.verifier.policy_store import SIGHUP_ACTOR
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


async def serve_until_signalled(
    running: RunningVerifier, *, stopped: asyncio.Event | None = None
) -> None:
    """Serve until SIGTERM or SIGINT (or ``stopped``), then drain (server.drain_s): SIGHUP
    reloads the policy files and publishes them to the database."""
    stop = stopped or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.create_task(reload_policy(running))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    logger.info("stopping: draining within %g s", running.drain_s)
    watchdog = _exit_after(running.drain_s + EXIT_MARGIN_S)
    try:
        await running.drain()
    finally:
        watchdog.cancel()


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


async def reload_policy(running: RunningVerifier) -> None:
    """SIGHUP: this process's policy files, loaded and published (the other processes and
    replicas follow); a policy that does not load, or a database that does not take it,
    leaves the old one in force, said in the log."""
    try:
        if running.shared_policy is not None:
            policy = await running.shared_policy.reload(actor=SIGHUP_ACTOR)
        else:
            policy = running.policy.reload()
    except PolicyError as exc:
        logger.error("SIGHUP: policy refused, the old one stays: %s", exc)  # noqa: TRY400
        return
    except Exception as exc:
        if not is_outage(exc):
            raise
        logger.error("SIGHUP: the database did not take the policy, the old one stays: %s", exc)  # noqa: TRY400
        return
    if policy is not None:
        logger.info("SIGHUP: policy %s loaded (%d rules)", policy.policy_id, len(policy.rules))


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
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> None:
        self._config = config
        self._count = count
        self._level = level
        self._backoff_s = backoff_s
        self._context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(WorkerPlace(i, count)) for i in range(count)]
        self._stop = asyncio.Event()

    @property
    def pids(self) -> list[int]:
        """The pid of each worker now (0: none running)."""
        return [(w.process.pid or 0) if w.process is not None else 0 for w in self._workers]

    def stop(self) -> None:
        self._stop.set()

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
            await asyncio.gather(*(self._keep(w) for w in self._workers))
        finally:
            await self.shutdown()

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
            if worker.conn is not None:
                worker.conn.close()
                worker.conn = None

    async def _spawn(self, worker: _Worker) -> None:
        """Start the worker and wait until it serves; ConfigError with its message when it
        could not start."""
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(self._config, worker.place, theirs, self._level),
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
            if worker.conn is not None:
                worker.conn.close()
                worker.conn = None
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


async def supervise(config: VerifierConfig, count: int, *, level: int = logging.INFO) -> None:
    """`serve` with ``count`` workers, until SIGTERM or SIGINT."""
    concrete, held = hold_ports(config)
    try:
        # Checked and migrated once, here: the workers open it migrated.
        repos = await open_repositories(concrete.database)
        await repos.close()
        supervisor = Supervisor(concrete, count, level=level)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.stop)
        loop.add_signal_handler(signal.SIGHUP, supervisor.signal_all, signal.SIGHUP)
        await supervisor.start()
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
        for sock in held:
            sock.close()


# --- a worker ---------------------------------------------------------------------------------


def worker_main(config: VerifierConfig, place: WorkerPlace, conn: Connection, level: int) -> None:
    """A worker process's body (multiprocessing, spawn): serve until told to stop, or until
    the parent is gone."""
    configure_logging(level)
    fmt = f"%(asctime)s %(levelname)s {place.name}[%(process)d] %(name)s: %(message)s"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(IsoFormatter(fmt))
    try:
        asyncio.run(_work(config, place, conn))
    except (DevtrustError, OSError) as exc:
        with contextlib.suppress(OSError):
            conn.send((_FAILED, one_line(exc)))
        sys.exit(2)


async def _work(config: VerifierConfig, place: WorkerPlace, conn: Connection) -> None:
    running = await start_verifier(config, worker=place)
    conn.send((_READY, str(os.getpid())))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The parent's end closes when it exits (even killed): this worker stops then.
    loop.add_reader(conn.fileno(), _on_parent(conn, stop.set))
    try:
        await serve_until_signalled(running, stopped=stop)
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
