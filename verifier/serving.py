"""Serving until told to stop: the loop the single process and each worker share
(verifier/workers.py runs one per worker). SIGTERM or SIGINT drains (server.drain_s); SIGHUP
reloads the policy files and publishes them; the process's state (``ServingState``) is told
as it changes and periodically: to systemd by the single process (sd_notify: READY=1,
STATUS=, WATCHDOG=1, RELOADING=1/READY=1, STOPPING=1), to the parent by a worker, for which
it is also a heartbeat (the parent kills a worker that falls silent)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable

from devtrust.core.command import one_line
from devtrust.core.errors import ConfigError
from devtrust.core.sdnotify import Notifier, start_watchdog
from devtrust.verifier.policy import PolicyError
from devtrust.verifier.policy_store import SIGHUP_ACTOR
from devtrust.verifier.running import ServingState, status_line
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.store_health import is_outage

logger = logging.getLogger("devtrust.verifier.serving")
# A process still running this long after its drain's bound exits anyway (_exit_after).
EXIT_MARGIN_S = 5.0

# How often a process looks at its state for STATUS= (a change of policy or of the database's
# state is told within this), and how often the line is sent anyway (the stream count).
STATUS_CHECK_S = 1.0
STATUS_REFRESH_S = 10.0

# What a process tells about itself: its state for STATUS= (``ServingState``), or how a
# SIGHUP's reload went (a line). The single process tells systemd (``_to_systemd``); a
# worker, its parent, over the pipe between them (the ``tell`` in ``_work``).
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
        await reload_and_tell(running, tell)

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


async def reload_and_tell(running: RunningVerifier, tell: Tell | None) -> None:
    """SIGHUP's reload, and how it went told, whatever happened: after RELOADING=1, systemd
    stays "reloading" until a READY=1 (to its start timeout), so a reload that raised is
    told too ("reload failed: ..."), and logged with its traceback."""
    try:
        outcome = await reload_policy(running)
    except Exception as exc:
        logger.exception("SIGHUP: the reload failed; the old policy stays")
        outcome = f"reload failed, {_in_force(running)} stays: {one_line(exc)}"
    outcome += await reload_gpu(running)
    if tell is not None:
        tell(outcome)


async def _report_state(running: RunningVerifier, tell: Tell, refresh_s: float) -> None:
    """``running``'s state, told now, on each change of policy or database state (looked
    at every STATUS_CHECK_S or ``refresh_s`` if sooner) and every ``refresh_s``. It is a
    worker's heartbeat, so it never ends on an error: one that looking at the state or
    telling it raised is logged (once per kind) and the next round tries again; a
    heartbeat that stopped would get a healthy worker killed over and over."""
    loop = asyncio.get_running_loop()
    told: ServingState | None = None
    told_at = 0.0
    failed: set[str] = set()
    while True:
        try:
            state = running.state()
            if not state.same_kind(told) or loop.time() - told_at >= refresh_s:
                tell(state)
                told, told_at = state, loop.time()
        except Exception as exc:
            if type(exc).__name__ not in failed:
                failed.add(type(exc).__name__)
                logger.exception("cannot report this process's state; trying again")
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


async def reload_gpu(running: RunningVerifier) -> str:
    """SIGHUP: the GPU roots, RIM store and revocation data read again (an operator added
    RIMs or fetched CRLs), on a thread (each stored RIM's signature is verified again, ~20 ms
    each: the streams are served meanwhile); when they do not load, the old stay. What
    happened, for STATUS=."""
    if running.gpu is None:
        return ""
    try:
        await asyncio.to_thread(running.gpu.reload)
    except ConfigError as exc:
        logger.error("SIGHUP: GPU attestation data refused, the old stay: %s", exc)  # noqa: TRY400
        return f"; GPU attestation data refused, the old stay: {exc}"
    return "; GPU attestation data reloaded"


def _in_force(running: RunningVerifier) -> str:
    current = running.policy.current
    return "no policy" if current is None else f"policy {current.policy_id}"
