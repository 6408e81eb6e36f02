"""A verifier running: its two servers and what they serve, and how it stops: ``drain``
(SIGTERM, issue 12 C4) within server.drain_s, or ``stop`` at once. Made by
verifier/server.py ``start_verifier``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health

from devtrust.core.errors import ConfigError
from devtrust.verifier.attest_service import AttestationService
from devtrust.verifier.gpu.anchors import GpuAnchorsHolder
from devtrust.verifier.interceptor import UnaryCalls
from devtrust.verifier.policy import PolicyHolder
from devtrust.verifier.policy_store import SharedPolicy
from devtrust.verifier.revocation import Revoker
from devtrust.verifier.storage import Repositories
from devtrust.verifier.storage.changes import ChangeFeed
from devtrust.verifier.store_health import StoreHealth, is_outage
from devtrust.verifier.watch import TrustWatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingState:
    """What a verifier process's STATUS= line says (sd_notify, verifier/workers.py): its open
    attestation streams, the policy in force (its policy_id; None: no policy) and whether the
    database answers (health SERVING)."""

    streams: int
    policy: str | None
    store_up: bool

    def same_kind(self, other: ServingState | None) -> bool:
        """Whether only the stream count differs: a change of policy or of the database's
        state is told at once, a new count with the next periodic refresh."""
        return other is not None and (self.policy, self.store_up) == (
            other.policy,
            other.store_up,
        )


def status_line(states: Sequence[ServingState], *, workers: int | None = None) -> str:
    """One STATUS= line for a single process (one state) or a parent of ``workers`` (the
    states its workers last reported): ``serving: 12 attestation streams, policy P, store
    ok``."""
    head = "serving" if workers is None else f"serving with {workers} workers"
    if not states:
        return f"{head}: waiting for the workers' state"
    streams = sum(s.streams for s in states)
    policies = sorted({s.policy or "none" for s in states})
    down = sum(1 for s in states if not s.store_up)
    if down == 0:
        store = "store ok"
    elif workers is None:
        store = "store UNAVAILABLE (health NOT_SERVING)"
    else:
        store = f"store UNAVAILABLE in {down} of {len(states)} workers (health NOT_SERVING)"
    noun = "stream" if streams == 1 else "streams"
    policy = f"policy {policies[0]}" if len(policies) == 1 else f"policies {', '.join(policies)}"
    return f"{head}: {streams} attestation {noun}, {policy}, {store}"


@dataclass
class RunningVerifier:
    enrollment_server: grpc.aio.Server
    attestation_server: grpc.aio.Server
    enrollment_port: int
    attestation_port: int
    repos: Repositories
    policy: PolicyHolder
    attestation: AttestationService
    revoker: Revoker
    watch: TrustWatch = field(default_factory=TrustWatch)
    # The services each port serves (full names): every method has a row in authz's table.
    services: dict[str, tuple[str, ...]] = field(default_factory=dict)
    started: list[grpc.aio.Server] = field(default_factory=list)
    # What the other processes on the database changed (verifier/storage/sqlite_changes.py).
    feed: ChangeFeed | None = None
    # Both ports' health servicers, and the database's state they show.
    health: list[health.aio.HealthServicer] = field(default_factory=list)
    store_health: StoreHealth | None = None
    # SIGTERM's bound (server.drain_s).
    drain_s: float = 10.0
    # The fleet's policy, kept to the database's (ReloadPolicy and SIGHUP publish).
    shared_policy: SharedPolicy | None = None
    # The unary calls in flight on both ports (a drain lets them finish).
    calls: UnaryCalls | None = None
    # What GPU reports are checked against (roots, RIM store, revocation): reloaded on SIGHUP.
    gpu: GpuAnchorsHolder | None = None
    stopped: bool = False

    def state(self) -> ServingState:
        """This process's state for STATUS= (sd_notify)."""
        current = self.policy.current
        return ServingState(
            streams=self.attestation.open_streams,
            policy=None if current is None else current.policy_id,
            store_up=self.store_health is None or self.store_health.up,
        )

    async def drain(self, limit_s: float | None = None) -> None:
        """Stop gracefully within ``limit_s`` (default server.drain_s): health NOT_SERVING
        on both ports for every service name, each attestation stream ended once no
        evidence is outstanding on it (its decision stored and answered) with the drain's
        status (verifier/attest_service.py), new streams refused the same way, the watches
        ended, unary calls in flight finished; then ``stop``."""
        limit = self.drain_s if limit_s is None else limit_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        logger.info(
            "draining: health NOT_SERVING, %d attestation streams to end within %g s",
            self.attestation.open_streams,
            limit,
        )
        if self.store_health is not None:
            await self.store_health.aclose()  # it would set SERVING again
        for servicer in self.health:
            await servicer.enter_graceful_shutdown()
        # The last part of the bound is for stopping the servers and closing the store.
        reserve = min(1.0, limit / 4)
        await self.attestation.drain(deadline - reserve)
        logger.debug("drain: streams done")
        self.watch.close()  # watchers get what is queued, then their streams end
        if self.calls is not None and not await self.calls.settled(
            deadline - reserve - loop.time()
        ):
            logger.warning("draining: %d unary calls still running, cut", self.calls.count)
        # What is left (health watches, revocation feeds, a call that came late): a short
        # grace, then cancelled.
        logger.debug("drain: calls settled")
        left = max(0.0, deadline - loop.time())
        await self.stop(grace=min(left, 0.5), decisions_s=max(left, 0.1))
        logger.info("drained in %.2f s", limit - (deadline - loop.time()))

    async def stop(self, grace: float | None = 1.0, *, decisions_s: float | None = None) -> None:
        """Stop what was started (grpc refuses to stop a server that never started), let
        appraisals in flight finish writing (within ``decisions_s`` when given), then close
        the store. Once: a second call does nothing."""
        if self.stopped:
            return
        self.stopped = True
        if self.store_health is not None:
            await self.store_health.aclose()
        self.watch.close()  # watchers get what is queued, then their streams end
        # Both at once: the grace is one bound, not one per server.
        logger.debug("stop: servers")
        await asyncio.gather(*(server.stop(grace) for server in self.started))
        self.started.clear()
        logger.debug("stop: attestation")
        await self.attestation.aclose(within_s=decisions_s)
        logger.debug("stop: revoker")
        await self.revoker.aclose()
        logger.debug("stop: feed")
        if self.feed is not None:
            await self.feed.aclose()
        logger.debug("stop: repos")
        await self.repos.close()
        logger.debug("stop: done")
        if self.shared_policy is not None:
            self.shared_policy.close()

    async def wait(self) -> None:
        await self.attestation_server.wait_for_termination()


def unavailable_at_start(exc: BaseException) -> bool:
    """Whether a verifier (or a worker) did not start because the database did not answer,
    which passes (exit 75, restarted), rather than for a mistake (exit 2): an outage
    (``store_health.is_outage``), or the PostgreSQL backend's ConfigError when no server
    answered (refused, timed out, no route), which the storage raises ``from None`` over
    psycopg's error: a wrong host as well as a server still starting at boot, and the second
    must not leave the verifier down. A server that answered and refused (credentials, no
    such database) stays a mistake: the storage's own ``explain`` tells them apart."""
    if is_outage(exc):
        return True
    context = exc.__context__
    if not isinstance(exc, ConfigError) or context is None or not is_outage(context):
        return False
    import psycopg  # noqa: PLC0415 - only after a PostgreSQL error

    from devtrust.verifier.storage.postgresql import explain  # noqa: PLC0415

    return isinstance(context, psycopg.Error) and ": cannot reach PostgreSQL (" in explain(
        context, ""
    )
