"""The Attestation service (DESIGN.md flow 2): one long-lived stream per device.

The verifier drives. After the agent's Hello it sends a Challenge (a fresh 32-byte nonce, the
PCR selection); the agent answers with Evidence; the verifier appraises it, publishes the
decision (stored first), and answers with a Result, which carries the next Challenge too
when that one is due at once (after a reboot). Otherwise the next Challenge follows after
the configured interval, or sooner when the agent sends PostureChanged. Nonces live in this
stream only: replicas share no nonce state, and each nonce is used once.

A drain (C4, issue 12: the verifier stopping on SIGTERM) ends every stream where no
evidence is outstanding: a stream idle or waiting for Hello at once, one whose challenge is
out once its evidence is decided, stored and answered (the Result goes without a next
challenge). Each ends with UNAVAILABLE, ``DRAIN_DETAILS`` and the trailing metadata
``devtrust-drain: 1``, which tells the agent to reconnect at once to another verifier; a new
stream meanwhile is refused the same way.

This module is the I/O shell around three pure parts: it reads the gRPC stream and feeds the
protocol (verifier/stream.py), carries out the actions the protocol returns, runs the
attestor (verifier/attestor.py) on a worker thread, publishes each Decision to the sinks
(verifier/decision.py), and converts messages through verifier/wire_attest.py.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from devtrust.core.ids import DeviceId, Nonce
from devtrust.v1 import attestation_pb2, attestation_pb2_grpc
from devtrust.verifier import wire_attest
from devtrust.verifier.attestor import Attestor, DeviceSession, may_attest
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.decision import (
    Decision,
    DecisionSink,
    Detections,
    DeviceChanged,
    Verdict,
    verdict_of,
)
from devtrust.verifier.errors import Rejected, Superseded
from devtrust.verifier.identity import peer_device_id
from devtrust.verifier.logtext import printable
from devtrust.verifier.records import DeviceRecord
from devtrust.verifier.settings import AttestationSettings
from devtrust.verifier.storage import Repositories
from devtrust.verifier.stream import (
    Action,
    Appraise,
    Appraised,
    Close,
    Event,
    HelloReceived,
    Opened,
    Phase,
    PostureChanged,
    RecentChallenges,
    SendChallenge,
    SendResult,
    StreamEnded,
    StreamProtocol,
    Tick,
    Wait,
)
from devtrust.verifier.tpm_unavailable import Answer

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are on
    from devtrust.verifier.metrics import VerifierMetricsService

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
# Appraisals of one evidence when the device keeps changing under them (DeviceChanged).
_REAPPRAISALS = 3
# How a drain ends a stream (C4): the agent reconnects at once, to its next address.
DRAIN_DETAILS = "verifier draining: reconnect to another verifier"
DRAIN_METADATA = (("devtrust-drain", "1"),)


class _Drained(Exception):
    """The stream reached a point where a drain may end it."""


class StreamLeases(Protocol):
    """Each device's stream lease, shared by every process serving the store
    (verifier/storage/changes.py SqlStreams)."""

    async def claim(self, device_id: DeviceId, owner: str) -> int: ...


@dataclass
class _Live:
    """The one live stream of a device: a newer stream replaces it (issue 7, item 8)."""

    task: asyncio.Task[Any] | None
    superseded: bool = False
    # Its lease on the device (None: the service has no leases).
    lease: int | None = None
    # The decision in the making (appraisal, then publishing): cancelling the stream does
    # not stop it, and a newer stream waits for it before reading what it stores.
    inflight: asyncio.Task[Decision] | None = None
    # Waiting for a message with no evidence outstanding: a drain may cancel it there.
    idle: bool = False
    # Cancelled by a drain: it ends with the drain's status.
    drained: bool = False
    # The device's last stored verdict as this stream knows it (read when it opened, then
    # each of its decisions'): a posture note's answer that differs is a detection.
    verdict: Verdict | None = None


class AttestationService(attestation_pb2_grpc.AttestationServicer):
    def __init__(
        self,
        *,
        repos: Repositories,
        attestor: Attestor,
        sinks: DecisionSink,
        settings: AttestationSettings,
        limits: LimitsConfig,
        clock: Clock,
        leases: StreamLeases | None = None,
        owner: str = "verifier",
        metrics: VerifierMetricsService | None = None,
    ) -> None:
        self._repos = repos
        # The verifier's metrics: this service keeps the open-streams gauge (the decisions'
        # metrics are a sink's, verifier/metrics.py), and closes the endpoint and its fleet
        # reader in ``aclose``, after the decisions in flight and before the store closes.
        self.metrics_service = metrics
        self._metrics = metrics.metrics if metrics is not None else None
        # With leases: each stream claims its device's lease, and the store refuses the
        # decisions of a stream whose device opened a newer one, here or on another process.
        self._leases = leases
        self._owner = owner
        self._streams_opened = 0
        self._attestor = attestor
        self._sinks = sinks
        self._settings = settings
        self._limits = limits
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._inflight: set[asyncio.Task[Decision]] = set()
        # Each device's decision in flight: its next one waits for it (see _decide).
        self._deciding: dict[str, asyncio.Task[Decision]] = {}
        # Monotonic time of each device's last challenge, across its streams, while it
        # still delays a new stream's first challenge.
        self._challenged = RecentChallenges(settings.stream.stream_challenge_gap_s)
        # Which answers to posture notes are timed as detections (metrics on only).
        self._detections = Detections()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.appraisal_workers, thread_name_prefix="appraise"
        )
        # Held for the length of one appraisal (see _decision).
        self._workers = asyncio.Semaphore(settings.appraisal_workers)
        # Set by drain: new streams are refused, open ones end at their next safe point.
        self._draining = False

    @property
    def open_streams(self) -> int:
        return len(self._live)

    async def drain(self, deadline: float) -> None:
        """End every stream as a drain does (see the module's docstring): new streams are
        refused from now on, idle ones end at once, the others after their decision; at
        ``deadline`` (event loop time) those still open are ended where they are (a decision
        in flight still finishes storing: ``aclose`` waits for it)."""
        self._draining = True
        loop = asyncio.get_running_loop()
        for live in list(self._live.values()):
            if live.idle:
                self._cut(live)
        while self._live and loop.time() < deadline:
            # Only tasks still running: a done one (its entry not yet removed) would make
            # ``asyncio.wait`` return at once, and this loop spin to the deadline.
            tasks = {
                live.task
                for live in self._live.values()
                if live.task is not None and not live.task.done()
            }
            if not tasks:
                break
            await asyncio.wait(tasks, timeout=deadline - loop.time())
        for live in list(self._live.values()):
            self._cut(live)
        tasks = {live.task for live in self._live.values() if live.task is not None}
        if tasks:  # each ends at its next await: its abort is all that is left
            await asyncio.wait(tasks, timeout=1.0)

    @staticmethod
    def _cut(live: _Live) -> None:
        if live.task is not None and not live.task.done() and not live.drained:
            live.drained = True
            live.task.cancel()

    async def aclose(self, within_s: float | None = None) -> None:
        """Let the decisions in flight finish (they are published to the store), within
        ``within_s`` when given, then stop the workers."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=within_s)
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        self._attestor.close()
        if self.metrics_service is not None:
            await self.metrics_service.aclose()

    def _count_streams(self) -> None:
        if self._metrics is not None:
            self._metrics.streams.set(len(self._live))

    async def _take_over(self, device_id: DeviceId, me: _Live) -> None:
        """Register ``me`` as the device's only stream, ending an older stream first. The
        caller removes the entry in its ``finally``, whatever happens here: a client that
        cancels while this waits (for the older stream, its decision, or the lease) must not
        leave an entry behind (review M2: a phantom stream in the gauge and in drains)."""
        old = self._live.get(device_id)
        self._live[device_id] = me
        self._count_streams()
        if old is not None and old.task is not None and not old.task.done():
            old.superseded = True
            old.task.cancel()
            limit = self._settings.stream.evidence_timeout_s
            await asyncio.wait({old.task}, timeout=limit)
            # Its decision in flight stores the device's TPM state and trust: let it finish
            # before this stream reads them.
            if old.inflight is not None:
                await asyncio.wait({old.inflight}, timeout=limit)
            logger.info("stream replaced device=%s: a newer stream took over", device_id)
        if self._leases is not None:
            # After the older stream here is done with its decision (above): on another
            # process, an older stream's next decision is refused by the store from now on.
            # The device id is the peer certificate's: a device claims only its own lease.
            self._streams_opened += 1
            owner = f"{self._owner} stream {self._streams_opened}"
            me.lease = await self._leases.claim(device_id, owner)

    async def _attesting(self, device_id: DeviceId) -> DeviceRecord:
        return may_attest(device_id, await self._repos.devices.get(device_id))

    # grpc.aio accepts a coroutine that writes with context.write for a streaming response;
    # the generated servicer's signature only knows iterators.
    async def Attest(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[attestation_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if self._draining:
            await _end_drained(context)
        # The peer's channel certificate names an enrolled device that is not revoked.
        device_id = peer_device_id(context, trust_domain=self._settings.trust_domain)
        record = await self._attesting(device_id)
        me = _Live(asyncio.current_task())
        try:
            await self._take_over(device_id, me)
            # Read with context.read (verifier/attest_service.py _Reader), not the iterator.
            await self._attest(context, record, me)
        except _Drained:
            pass
        except asyncio.CancelledError:
            if me.superseded:
                raise Superseded(
                    f"device {device_id}: a newer attestation stream replaced this one"
                ) from None
            if not me.drained:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        else:
            return
        finally:
            if self._live.get(device_id) is me:
                del self._live[device_id]
                self._count_streams()
        logger.info("stream drained device=%s: told to reconnect elsewhere", device_id)
        await _end_drained(context)

    async def _attest(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        record: DeviceRecord,
        me: _Live,
    ) -> None:
        device_id = record.device_id
        latest = await self._repos.trust.latest(device_id)
        me.verdict = verdict_of(latest) if latest is not None else None
        session = self._attestor.open_session(
            record,
            # Without the stored log: the first challenge asks for the whole log anyway.
            tpm=await self._repos.trust.tpm_state(device_id, with_log=False),
            previous_tier=latest.tier if latest is not None else None,
        )
        session.lease = me.lease
        protocol = StreamProtocol(self._settings.stream, device_id)
        reader = _Reader(context)
        msg: attestation_pb2.AgentMessage | None = None
        decision: Decision | None = None
        opened = time.monotonic()
        event: Event = Opened(opened, self._challenged.last(device_id, opened))
        try:
            while True:
                actions = protocol.feed(event)
                if isinstance(event, (HelloReceived, PostureChanged)):
                    self._accepted(device_id, event, msg, actions)
                upcoming: Event | None = None
                for action in actions:
                    match action:
                        case SendChallenge(nonce):
                            if self._draining:  # no new work on a stream that is ending
                                raise _Drained
                            await self._send(context, session, challenge=nonce)
                        case SendResult(next_in, nonce):
                            assert decision is not None
                            # Draining: the Result, stored already, goes without the next
                            # challenge, and the stream ends.
                            drained = self._draining
                            await self._send(
                                context,
                                session,
                                decision,
                                next_in=next_in,
                                challenge=None if drained else nonce,
                            )
                            if drained:
                                raise _Drained
                        case Appraise(nonce, noted):
                            assert msg is not None
                            decision = await self._decide(
                                me, session, nonce, msg, received=event.now, noted=noted
                            )
                            me.verdict = verdict_of(decision.result)
                            upcoming = Appraised(time.monotonic(), rebooted=decision.rebooted)
                        case Wait(until):
                            # Evidence outstanding: a drain waits for it and its decision.
                            me.idle = protocol.phase is not Phase.CHALLENGED
                            if me.idle and self._draining:
                                raise _Drained
                            try:
                                msg, upcoming = await reader.next(
                                    until, deadline=protocol.tick_closes
                                )
                            finally:
                                me.idle = False
                        case Close(error):
                            if error is not None:
                                raise error
                            return
                # The protocol ends every answer with Wait, Appraise or Close.
                assert upcoming is not None, actions
                event = upcoming
        finally:
            reader.close()

    def _accepted(
        self,
        device_id: str,
        event: HelloReceived | PostureChanged,
        msg: attestation_pb2.AgentMessage | None,
        actions: list[Action],
    ) -> None:
        """Log a message the protocol accepted; a posture note's signals are validated
        then (past limits.max_posture_signals the stream ends)."""
        if any(isinstance(a, Close) for a in actions):
            return
        if isinstance(event, HelloReceived):
            logger.info("stream open device=%s agent=%s", device_id, printable(event.agent_version))
            return
        assert msg is not None
        signals = wire_attest.posture_signals_of(msg, self._limits)
        logger.debug(
            "posture changed device=%s signals=%s", device_id, printable(",".join(signals))
        )

    async def _send(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        session: DeviceSession,
        decision: Decision | None = None,
        *,
        next_in: float = 0.0,
        challenge: Nonce | None = None,
    ) -> None:
        """One VerifierMessage: a decision's Result, a challenge, or both."""
        result = (
            wire_attest.decision_to_wire(decision, next_challenge_in=next_in)
            if decision is not None
            else None
        )
        message = wire_attest.verifier_message(
            result=result,
            challenge=(
                wire_attest.challenge_to_wire(
                    challenge,
                    selection=self._settings.selection,
                    log_offset=session.log_offset,
                )
                if challenge is not None
                else None
            ),
        )
        await context.write(message)
        if challenge is not None:
            self._challenged.note(session.record.device_id, time.monotonic())

    async def _decide(
        self,
        me: _Live,
        session: DeviceSession,
        nonce: Nonce,
        msg: attestation_pb2.AgentMessage,
        *,
        received: float,
        noted: float | None,
    ) -> Decision:
        """The decision on the Evidence in ``msg``, converted here: a malformed one ends the
        stream before anything is read, appraised or stored."""
        evidence = wire_attest.evidence_of(msg, self._limits)
        device_id = session.record.device_id
        # One decision per device at a time: a stream its agent closes leaves its decision
        # running (below), and a device reconnecting at once must not stack decisions
        # behind a slow one, each holding its evidence. This wait is the stream's own:
        # cancelled with it.
        earlier = self._deciding.get(device_id)
        if earlier is not None and not earlier.done():
            await asyncio.wait({earlier})
        task = asyncio.ensure_future(
            self._decision(
                session, nonce, evidence, received=received, noted=noted, previous=me.verdict
            )
        )
        me.inflight = task
        self._inflight.add(task)
        self._deciding[device_id] = task
        task.add_done_callback(functools.partial(self._finished, device_id))
        # Shielded: a stream cancelled meanwhile (replaced, or the server stopping) does not
        # lose a decision half made; the newer stream and aclose wait for it.
        return await asyncio.shield(task)

    def _finished(self, device_id: str, task: asyncio.Task[Decision]) -> None:
        self._inflight.discard(task)
        if self._deciding.get(device_id) is task:
            del self._deciding[device_id]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here, so that the error of a decision whose stream ended meanwhile
            # (replaced, or the server stopping) is not reported as never retrieved; a stream
            # still waiting gets it raised as well.
            logger.debug("decision abandoned: %s", task.exception())

    async def _decision(
        self,
        session: DeviceSession,
        nonce: Nonce,
        evidence: Answer,
        *,
        received: float | None = None,
        noted: float | None = None,
        previous: Verdict | None = None,
    ) -> Decision:
        """Appraise (on a worker thread when costly), publish (store first).

        The device is not read again before each appraisal: the store checks, in the
        transaction that would store the decision, that the device is still as the stream
        knows it (state, AK, zone, labels: Decision.assumed). A device revoked, sent back
        to approval or enrolled again with another AK meanwhile (even while its evidence
        waited for a worker) gets nothing stored, no certificate and no Result (refresh
        raises); one an operator moved or relabelled is appraised again, at once, as it is
        now. The same evidence and nonce, the session rewound to before the refused one."""
        for _ in range(_REAPPRAISALS):
            mark = session.mark()
            async with self._workers:
                now = self._clock()
                if self._attestor.cheap(session, evidence):
                    # The policy's cached outcome holds and the log part is short: the
                    # checks cost less than the hop to a thread and back.
                    decision = self._attestor.decide(session, nonce, evidence, now=now)
                else:
                    # A costly appraisal (a policy to evaluate, a long event log) runs on a
                    # worker thread: it cannot hold up other devices' streams on this loop.
                    future = self._pool.submit(
                        self._attestor.decide, session, nonce, evidence, now=now
                    )
                    decision = await asyncio.wrap_future(future)
            if self._metrics is not None:
                # Timed as a detection only when it is one (decision.py Detections).
                detected = self._detections.detection(
                    decision, noted=noted, previous=previous, now=time.monotonic()
                )
                decision = replace(decision, received=received, posture_noted=detected)
            try:
                # A sink may add to the decision (the revocation sink: serials to drop).
                published = await self._sinks.publish(decision) or decision
            except DeviceChanged as changed:
                session.rewind(mark)
                # Rejected (the stream ends) unless the device may still attest.
                self._attestor.refresh(session, changed.record)
            else:
                if decision.posture_noted is not None:  # stored and timed: its window starts
                    self._detections.timed(decision.device_id, time.monotonic())
                return published
        raise Rejected(
            f"device {session.record.device_id}: changed by operators during each of "
            f"{_REAPPRAISALS} appraisals in a row; reconnect"
        )


async def _end_drained(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """End the stream as a drain does (raises grpc.aio.AbortError)."""
    await context.abort(
        grpc.StatusCode.UNAVAILABLE, DRAIN_DETAILS, trailing_metadata=DRAIN_METADATA
    )


class _Reader:
    """The stream's messages, read with ``context.read`` by the stream's own task: no reader
    task, queue or ``wait_for`` per message (issue 11). A wait for a deadline (Hello, or the
    evidence of a challenge: when it passes the stream ends) runs one timer around the read
    (``asyncio.timeout``). A wait that ends in a Tick the stream lives on after (the next
    challenge due in IDLE) must not lose the message a cancelled read may have taken, so
    that read runs as a task and stays pending across the Tick, read by the next wait: one
    task per challenge interval, not per message."""

    __slots__ = ("_context", "_pending")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._pending: asyncio.Future[Any] | None = None

    async def next(
        self, until: float, *, deadline: bool
    ) -> tuple[attestation_pb2.AgentMessage | None, Event]:
        """The next message and its event, or a Tick when none came by ``until``."""
        pending = self._pending
        if pending is None and (deadline or math.isinf(until)):
            try:
                if math.isinf(until):
                    item = await self._context.read()
                else:
                    async with asyncio.timeout(max(0.0, until - time.monotonic())):
                        item = await self._context.read()
            except TimeoutError:
                # The timer fired for ``until`` (possibly a clock tick early).
                return None, Tick(max(time.monotonic(), until))
        else:
            if pending is None:
                pending = self._pending = asyncio.ensure_future(self._context.read())
            wait = None if math.isinf(until) else max(0.0, until - time.monotonic())
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                return None, Tick(max(time.monotonic(), until))
            self._pending = None
            item = pending.result()
        now = time.monotonic()
        if item is grpc.aio.EOF:
            return None, StreamEnded(now)
        return item, wire_attest.agent_event(item, now)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
