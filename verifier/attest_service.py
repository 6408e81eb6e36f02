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
import datetime
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from protos.devtrust.v1 import attestation_pb2, attestation_pb2_grpc, common_pb2
from verifier import wire
from verifier.appraisal import NONCE_SIZE, Appraisal, Evidence, Expectation, Nonce, appraise
from verifier.ca import CertificateAuthority, DeviceClaims
from verifier.config import VerifierConfig
from verifier.errors import FailedPrecondition, MalformedInput, Rejected
from verifier.identity import peer_identity
from verifier.policy import PolicyHolder, PolicyOutcome
from verifier.refs import ReferenceValues, RefGroup
from verifier.store import CertificateRecord, DeviceRecord, DeviceState, Store, TpmState
from verifier.tpm.constants import hash_name
from verifier.tpm.quote import AkKey
from verifier.tpm.structures import ak_qualified_names, parse_public
from verifier.trust import Tier

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
        cfg = self._config.attestation
        record = self._authorize(context)
        device_id = record.device_id
        session = _Session(
            record=record,
            ak_key=self._ak_key(device_id, record.ak_public),
            qualified_signers=ak_qualified_names(
                parse_public(record.ak_public), parse_public(record.ek_public)
            ),
            refs=self._refs.for_device(record.zone, record.labels) if self._refs else None,
            tpm=self._store.tpm_state(device_id),
        )

        inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
        pump = asyncio.create_task(_pump(request_iterator, inbox))
        try:
            first = await _next(inbox, cfg.hello_timeout_s, "Hello")
            if first is _EOF:
                return
            if first.WhichOneof("kind") != "hello":
                raise MalformedInput("the first message on an attestation stream must be Hello")
            logger.info("stream open device=%s agent=%s", device_id, first.hello.agent_version)
            outstanding: _Outstanding | None = None
            next_challenge = time.monotonic()
            # A change reported while a challenge is out: that evidence may predate it.
            posture_changed = False
            while True:
                if outstanding is None and time.monotonic() >= next_challenge:
                    outstanding = await self._challenge(context, session)
                wake = outstanding.deadline if outstanding else next_challenge
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
                    evidence = wire.evidence_from_wire(msg.evidence)
                    reply, again = self._appraise(session, nonce, evidence)
                    again, posture_changed = again or posture_changed, False
                    wait_s = 0.0 if again else cfg.interval_s
                    next_challenge = time.monotonic() + wait_s
                    reply.result.next_challenge_in.FromTimedelta(datetime.timedelta(seconds=wait_s))
                    await context.write(reply)
                elif kind == "posture_changed":
                    logger.info(
                        "posture changed device=%s signals=%s",
                        device_id,
                        ",".join(msg.posture_changed.signals),
                    )
                    next_challenge = time.monotonic()
                    posture_changed = outstanding is not None
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
        return _Outstanding(nonce, time.monotonic() + self._config.attestation.evidence_timeout_s)

    def _appraise(
        self, session: _Session, nonce: Nonce, evidence: Evidence
    ) -> tuple[attestation_pb2.VerifierMessage, bool]:
        """Appraise, record, maybe certify. Returns the reply and whether to challenge again
        at once (after a reboot, for the whole event log)."""
        cfg = self._config
        now = self._clock()
        device_id, zone = session.record.device_id, session.record.zone
        prior = session.tpm
        expect = Expectation(
            device_id=device_id,
            nonce=nonce,
            selection=cfg.attestation.selection,
            ak_key=session.ak_key,
            staleness=cfg.attestation.staleness,
            qualified_signers=session.qualified_signers,
            policy=self._policy.current,
            zone=session.record.zone,
            labels=session.record.labels,
            policy_cache=session.policy_cache,
            clock=prior.clock if prior else None,
            log=prior.log if prior else None,
            refs=session.refs,
        )
        appraisal = appraise(evidence, expect, now=now)
        session.policy_cache = appraisal.policy_cache
        tpm = None
        if appraisal.passed and appraisal.clock is not None:
            tpm = TpmState(clock=appraisal.clock, log=appraisal.log, pcrs=_pcrs_hex(evidence))
            session.tpm = tpm
            if evidence.event_log is not None or appraisal.rebooted:
                session.full_log = appraisal.rebooted
        result = appraisal.result
        reply = attestation_pb2.VerifierMessage()
        reply.result.trust.CopyFrom(wire.result_to_wire(result))
        cert_record = None
        if self._may_certify(appraisal, evidence):
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
            cert_record.serial if cert_record else "-",
            "; ".join(f"{f.id}: {f.message}" for f in result.findings) or "-",
        )
        return reply, appraisal.rebooted

    def _may_certify(self, appraisal: Appraisal, evidence: Evidence) -> bool:
        tier = appraisal.result.tier
        return (
            appraisal.passed
            and evidence.certify_key is not None
            and tier is not Tier.NONE
            and tier <= self._config.certificates.min
        )


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
