"""The Attestation service (DESIGN.md flow 2): one long-lived stream per device.

The verifier drives. After the agent's Hello it sends a Challenge (a fresh 32-byte nonce, the
PCR selection); the agent answers with Evidence; the verifier appraises it (pure, in
``verifier.appraisal``), records the result, issues a device certificate when the tier
allows and the agent asked for one, and answers with a Result. The next Challenge follows
after the configured interval, or at once when the agent sends PostureChanged. Nonces live
in this coroutine only: replicas share no nonce state, and each nonce is used once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2
from devtrust.verifier import wire
from devtrust.verifier.appraisal import (
    NONCE_SIZE,
    Appraisal,
    Evidence,
    Expectation,
    Nonce,
    appraise,
)
from devtrust.verifier.ca import CertificateAuthority, DeviceClaims
from devtrust.verifier.config import VerifierConfig
from devtrust.verifier.errors import (
    FailedPrecondition,
    MalformedInput,
    Rejected,
    ResourceExhausted,
    Superseded,
)
from devtrust.verifier.identity import peer_identity
from devtrust.verifier.logtext import printable
from devtrust.verifier.policy import PolicyHolder, PolicyOutcome
from devtrust.verifier.policy_pool import PolicyRunner, PooledPolicy
from devtrust.verifier.records import CertificateRecord, DeviceRecord, DeviceState, TpmState
from devtrust.verifier.refs import ReferenceValues, RefGroup
from devtrust.verifier.store import Store
from devtrust.verifier.tpm.constants import hash_name
from devtrust.verifier.tpm.quote import AkKey
from devtrust.verifier.tpm.structures import ak_qualified_names, parse_public
from devtrust.verifier.trust import Tier

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
_EOF = object()


@dataclass
class _Outstanding:
    nonce: Nonce
    deadline: float


@dataclass
class _Session:
    """What one stream knows about its device."""

    record: DeviceRecord
    ak_key: AkKey
    qualified_signers: frozenset[bytes]
    refs: RefGroup | None
    tpm: TpmState | None
    policy_cache: tuple[str, PolicyOutcome] | None = None
    # The first challenge of a stream, and the one after a reboot, ask for the whole log.
    full_log: bool = True

    @property
    def log_offset(self) -> int:
        if self.full_log or self.tpm is None or self.tpm.log is None:
            return 0
        return self.tpm.log.offset


@dataclass
class _Live:
    """The one live stream of a device: a newer stream replaces it (issue 7, item 8)."""

    task: asyncio.Task[Any] | None
    superseded: bool = False
    # The appraisal running on a worker thread: cancelling the stream does not stop it.
    inflight: concurrent.futures.Future[Any] | None = None


@dataclass
class ChallengeSchedule:
    """When a stream challenges next. Sans I/O: monotonic times in, times out.

    Periodic challenges come ``interval`` after each evidence, at once after a reboot. A
    PostureChanged note is answered with a challenge at once the first time; later notes
    coalesce into at most one challenge per ``posture_min_interval`` (issue 7, item 8). A
    note that arrives while a challenge is out is answered after that evidence (it may
    predate the change). More than ``notes_per_minute`` notes in a minute end the stream.
    """

    interval: float
    posture_min_interval: float
    notes_per_minute: int
    next_at: float = 0.0
    # Nothing is challenged before this (a new stream waits out the reconnect gap, whatever
    # it sends).
    not_before: float = float("-inf")
    last_posture_challenge: float = float("-inf")
    _pending: float | None = None  # a note arrived while a challenge was out
    _for_posture: bool = False  # the next challenge answers a note
    _recent: collections.deque[float] = field(default_factory=collections.deque)

    def challenge_sent(self, now: float) -> None:
        if self._for_posture:
            self.last_posture_challenge = now
            self._for_posture = False

    def evidence_received(self, now: float, *, rebooted: bool) -> float:
        """Schedule after an evidence; returns the wait until the next challenge."""
        if rebooted:
            self.next_at = now
        elif self._pending is not None:
            self.next_at = max(now, self._pending)
            self._for_posture = True
        else:
            self.next_at = now + self.interval
        self._pending = None
        return max(0.0, self.next_at - now)

    def posture_changed(self, now: float, *, outstanding: bool) -> None:
        recent = self._recent
        recent.append(now)
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if len(recent) > self.notes_per_minute:
            raise ResourceExhausted(
                f"{len(recent)} PostureChanged notes within a minute, more than the "
                f"{self.notes_per_minute} allowed (attestation.posture_notes_per_minute)"
            )
        due = max(now, self.last_posture_challenge + self.posture_min_interval, self.not_before)
        if outstanding:
            self._pending = due if self._pending is None else min(due, self._pending)
        elif due < self.next_at:
            self.next_at = due
            self._for_posture = True


class AttestationService(attestation_pb2_grpc.AttestationServicer):
    def __init__(
        self,
        *,
        store: Store,
        ca: CertificateAuthority,
        config: VerifierConfig,
        clock: Clock,
        refs: ReferenceValues | None = None,
        policy: PolicyHolder | None = None,
    ) -> None:
        self._refs = refs
        self._policy = policy or PolicyHolder(None)
        self._store = store
        self._ca = ca
        self._config = config
        self._clock = clock
        self._ak_cache: dict[str, tuple[bytes, AkKey]] = {}
        self._live: dict[str, _Live] = {}
        # Monotonic time of each device's last challenge, across its streams.
        self._last_challenge: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=config.attestation.appraisal_workers, thread_name_prefix="appraise"
        )
        self._policy_runner = PolicyRunner(
            workers=config.attestation.policy_workers,
            budget_s=config.attestation.policy_budget_s,
        )

    def close(self) -> None:
        """Wait for appraisals in flight (they write to the store), then stop the workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._policy_runner.close()

    async def _take_over(self, device_id: str) -> _Live:
        """Register this stream as the device's only one, ending an older stream first."""
        me = _Live(asyncio.current_task())
        old = self._live.get(device_id)
        self._live[device_id] = me
        if old is not None and old.task is not None and not old.task.done():
            old.superseded = True
            old.task.cancel()
            limit = self._config.attestation.evidence_timeout_s
            await asyncio.wait({old.task}, timeout=limit)
            # Its appraisal in flight writes the device's TPM state and trust: let it finish
            # before this stream reads them.
            if old.inflight is not None:
                await asyncio.wait({asyncio.wrap_future(old.inflight)}, timeout=limit)
            logger.info("stream replaced device=%s: a newer stream took over", device_id)
        return me

    def _ak_key(self, device_id: str, ak_public: bytes) -> AkKey:
        """The AK key object, cached per device (reloading it costs ~90 us)."""
        cached = self._ak_cache.get(device_id)
        if cached is not None and cached[0] == ak_public:
            return cached[1]
        key = parse_public(ak_public).public_key()
        self._ak_cache[device_id] = (ak_public, key)
        return key

    def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> DeviceRecord:
        """The peer's channel certificate names an enrolled device that is not revoked."""
        device_id = peer_identity(context, trust_domain=self._config.trust_domain, kind="agent")
        return self._attesting(device_id)

    def _attesting(self, device_id: str) -> DeviceRecord:
        """The device's record, as long as it may attest: enrolled, not revoked, not awaiting
        approval. Checked when a stream opens and again before each appraisal."""
        record = self._store.get_device(device_id)
        if record is None:
            raise Rejected(f"device {device_id} is not enrolled")
        if record.state is DeviceState.REVOKED:
            raise Rejected(f"device {device_id} is revoked")
        if record.state is DeviceState.PENDING_APPROVAL:
            raise FailedPrecondition(f"device {device_id} awaits operator approval")
        return record

    # grpc.aio accepts a coroutine that writes with context.write for a streaming response;
    # the generated servicer's signature only knows iterators.
    async def Attest(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[attestation_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        record = self._authorize(context)
        device_id = record.device_id
        me = await self._take_over(device_id)
        try:
            await self._attest(request_iterator, context, record, me)
        except asyncio.CancelledError:
            if me.superseded:
                raise Superseded(
                    f"device {device_id}: a newer attestation stream replaced this one"
                ) from None
            raise
        finally:
            if self._live.get(device_id) is me:
                del self._live[device_id]

    async def _attest(
        self,
        request_iterator: AsyncIterator[attestation_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
        record: DeviceRecord,
        me: _Live,
    ) -> None:
        cfg = self._config.attestation
        limits = self._config.limits
        device_id = record.device_id
        session = _Session(
            record=record,
            ak_key=self._ak_key(device_id, record.ak_public),
            qualified_signers=ak_qualified_names(
                parse_public(record.ak_public), parse_public(record.ek_public)
            ),
            refs=self._refs.for_device(record.zone, record.labels) if self._refs else None,
            # Without the stored log: the first challenge asks for the whole log anyway.
            tpm=self._store.tpm_state(device_id, with_log=False),
        )

        inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
        pump = asyncio.create_task(_pump(request_iterator, inbox))
        try:
            first = await _next(inbox, cfg.hello_timeout_s, "Hello")
            if first is _EOF:
                return
            if first.WhichOneof("kind") != "hello":
                raise MalformedInput("the first message on an attestation stream must be Hello")
            logger.info(
                "stream open device=%s agent=%s", device_id, printable(first.hello.agent_version)
            )
            outstanding: _Outstanding | None = None
            # Reconnecting does not buy appraisals (issue 7, item 8): a new stream's first
            # challenge waits out the gap since the device's last one, PostureChanged or not.
            first_at = max(
                time.monotonic(),
                self._last_challenge.get(device_id, float("-inf")) + cfg.stream_challenge_gap_s,
            )
            schedule = ChallengeSchedule(
                cfg.interval_s,
                cfg.posture_min_interval_s,
                cfg.posture_notes_per_minute,
                next_at=first_at,
                not_before=first_at,
            )
            while True:
                if outstanding is None and time.monotonic() >= schedule.next_at:
                    schedule.challenge_sent(time.monotonic())
                    outstanding = await self._challenge(context, session)
                wake = outstanding.deadline if outstanding else schedule.next_at
                try:
                    msg = await asyncio.wait_for(inbox.get(), max(0.0, wake - time.monotonic()))
                except TimeoutError:
                    if outstanding is not None:
                        raise FailedPrecondition(
                            f"device {device_id}: no evidence within {cfg.evidence_timeout_s}s "
                            "of the challenge"
                        ) from None
                    continue
                if msg is _EOF:
                    return
                kind = msg.WhichOneof("kind")
                if kind == "evidence":
                    if outstanding is None:
                        raise MalformedInput("Evidence sent without an outstanding Challenge")
                    # The nonce is spent whatever the evidence says: used at most once.
                    nonce, outstanding = outstanding.nonce, None
                    evidence = wire.evidence_from_wire(msg.evidence, limits)
                    # Appraisal runs on a worker thread: a costly one (a long event log,
                    # many GPUs) cannot hold up other devices' streams on this loop.
                    me.inflight = self._pool.submit(self._appraise, session, nonce, evidence)
                    reply, rebooted = await asyncio.wrap_future(me.inflight)
                    wait_s = schedule.evidence_received(time.monotonic(), rebooted=rebooted)
                    reply.result.next_challenge_in.FromTimedelta(datetime.timedelta(seconds=wait_s))
                    await context.write(reply)
                elif kind == "posture_changed":
                    signals = wire.posture_signals_from_wire(msg.posture_changed, limits)
                    logger.debug(
                        "posture changed device=%s signals=%s",
                        device_id,
                        printable(",".join(signals)),
                    )
                    schedule.posture_changed(time.monotonic(), outstanding=outstanding is not None)
                elif kind == "hello":
                    raise MalformedInput("Hello sent twice on one stream")
                else:
                    raise MalformedInput("empty AgentMessage")
        finally:
            pump.cancel()

    async def _challenge(
        self, context: grpc.aio.ServicerContext[Any, Any], session: _Session
    ) -> _Outstanding:
        nonce = Nonce(secrets.token_bytes(NONCE_SIZE))
        msg = attestation_pb2.VerifierMessage()
        msg.challenge.CopyFrom(
            attestation_pb2.Challenge(
                nonce=nonce,
                pcr_selection=wire.selection_to_wire(self._config.attestation.selection),
                event_log=attestation_pb2.EventLogRequest(
                    wanted=True, from_offset=session.log_offset
                ),
            )
        )
        await context.write(msg)
        now = time.monotonic()
        self._last_challenge[session.record.device_id] = now
        return _Outstanding(nonce, now + self._config.attestation.evidence_timeout_s)

    def _appraise(
        self, session: _Session, nonce: Nonce, evidence: Evidence
    ) -> tuple[attestation_pb2.VerifierMessage, bool]:
        """Appraise, record, maybe certify. Returns the reply and whether to challenge again
        at once (after a reboot, for the whole event log)."""
        cfg = self._config
        now = self._clock()
        self._refresh(session)
        device_id, zone = session.record.device_id, session.record.zone
        prior = session.tpm
        expect = Expectation(
            device_id=device_id,
            nonce=nonce,
            selection=cfg.attestation.selection,
            ak_key=session.ak_key,
            staleness=cfg.attestation.staleness,
            qualified_signers=session.qualified_signers,
            policy=(
                PooledPolicy(self._policy.current, self._policy_runner)
                if self._policy.current is not None
                else None
            ),
            zone=session.record.zone,
            labels=session.record.labels,
            policy_cache=session.policy_cache,
            clock=prior.clock if prior else None,
            log=prior.log if prior else None,
            refs=session.refs,
            max_log_bytes=cfg.limits.max_event_log_bytes,
            max_log_events=cfg.limits.max_event_log_events,
        )
        appraisal = appraise(evidence, expect, now=now)
        session.policy_cache = appraisal.policy_cache
        tpm = None
        if appraisal.passed and appraisal.clock is not None:
            tpm = TpmState(
                clock=appraisal.clock,
                log=appraisal.log,
                pcrs=_pcrs_hex(evidence),
                log_part=appraisal.log_part,
            )
            session.tpm = tpm
            if evidence.event_log is not None or appraisal.rebooted:
                session.full_log = appraisal.rebooted
        result = appraisal.result
        reply = attestation_pb2.VerifierMessage()
        reply.result.trust.CopyFrom(wire.result_to_wire(result))
        cert_record = None
        withheld = self._withheld(appraisal, evidence)
        if withheld is None:
            assert evidence.certify_key is not None
            cert = self._ca.issue_device(
                trust_domain=cfg.trust_domain,
                device_id=device_id,
                public_key=evidence.certify_key,
                claims=DeviceClaims(tier=result.tier.label, zone=zone),
                now=now,
                lifetime=datetime.timedelta(seconds=cfg.certificates.device_lifetime_s),
            )
            der = cert.public_bytes(serialization.Encoding.DER)
            cert_record = CertificateRecord(
                serial=f"{cert.serial_number:x}",
                device_id=device_id,
                kind="device",
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                der=der,
            )
            reply.result.certificate.CopyFrom(
                common_pb2.DeviceCertificate(
                    certificate_der=der,
                    serial_hex=cert_record.serial,
                    not_before=wire.timestamp(cert_record.not_before),
                    not_after=wire.timestamp(cert_record.not_after),
                )
            )
        self._store.record_appraisal(result, certificate=cert_record, tpm=tpm)
        logger.info(
            "appraisal device=%s tier=%s score=%d cert=%s reasons=%s",
            device_id,
            result.tier.label,
            result.score,
            cert_record.serial if cert_record else f"- ({withheld})",
            # Finding messages quote device-supplied values: escaped (issue 7, item 9).
            printable("; ".join(f"{f.id}: {f.message}" for f in result.findings) or "-", 2048),
        )
        return reply, appraisal.rebooted

    def _refresh(self, session: _Session) -> None:
        """The device as the verifier knows it now, not as when its stream opened: a device
        revoked, sent back to approval or given another AK meanwhile is refused (its stream
        ends before anything is appraised or issued), and an operator's new zone or labels
        apply from this appraisal on, whatever the device does with its stream."""
        device_id = session.record.device_id
        record = self._attesting(device_id)
        if record.ak_public != session.record.ak_public:
            raise Rejected(
                f"device {device_id} enrolled again with another AK: this stream's AK is no "
                "longer the device's; reconnect"
            )
        if (record.zone, record.labels) != (session.record.zone, session.record.labels):
            session.refs = self._refs.for_device(record.zone, record.labels) if self._refs else None
            session.policy_cache = None
            logger.info(
                "device %s now in zone %s labels %s",
                device_id,
                printable(record.zone or "(unassigned)", 64),
                printable(record.labels),
            )
        session.record = record

    def _withheld(self, appraisal: Appraisal, evidence: Evidence) -> str | None:
        """Why no certificate is issued for this evidence, or None when one is."""
        tier, minimum = appraisal.result.tier, self._config.certificates.min
        if evidence.certify_key is None:
            return "none asked for"
        if not appraisal.passed:
            return "withheld: the quote did not verify"
        if not appraisal.key_possessed:
            return "withheld: no proof of possession of the key"
        if tier is Tier.NONE or tier > minimum:
            return f"withheld: tier {tier.label} is below certificates.min_tier {minimum.label}"
        return None


def _pcrs_hex(evidence: Evidence) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for (alg, index), value in sorted(evidence.pcrs.items()):
        out.setdefault(hash_name(alg), {})[index] = value.hex()
    return out


async def _pump(source: AsyncIterator[Any], inbox: asyncio.Queue[Any]) -> None:
    try:
        async for msg in source:
            await inbox.put(msg)
    finally:
        await inbox.put(_EOF)


async def _next(inbox: asyncio.Queue[Any], limit_s: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(inbox.get(), limit_s)
    except TimeoutError:
        raise FailedPrecondition(f"no {what} within {limit_s}s") from None
