"""Appraise one device's evidence and decide what follows (DESIGN.md flow 2).

The attestor builds the expectation from what the verifier knows of the device, appraises
(the pure ``appraise`` of verifier/appraisal.py), issues the device certificate when the
tier allows and the agent asked for one with proof of possession, and returns the
``Decision``. It touches neither storage nor protobuf: the servicer reads the device before
and publishes the decision after (verifier/attest_service.py). ``decide`` runs on a worker
thread, so that a costly appraisal (a long event log, many GPUs) holds up no other stream.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId, Nonce, serial_of
from devtrust.core.tier import Tier
from devtrust.verifier.appraisal import Appraisal, Evidence, Expectation, appraise, policy_key
from devtrust.verifier.ca import DeviceIssuers
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.decision import Decision, below_minimum
from devtrust.verifier.errors import FailedPrecondition, Rejected
from devtrust.verifier.gpu.anchors import GpuAnchorsHolder
from devtrust.verifier.logtext import printable
from devtrust.verifier.policy import GPU_ATTESTATION, PolicyHolder, PolicyOutcome
from devtrust.verifier.policy_pool import PolicyRunner, PooledPolicy
from devtrust.verifier.records import CertificateRecord, DeviceRecord, DeviceState, TpmState
from devtrust.verifier.refs import ReferenceValues, RefGroup
from devtrust.verifier.settings import AttestationSettings, CertificateSettings
from devtrust.verifier.tpm.constants import hash_name
from devtrust.verifier.tpm.quote import AkKey
from devtrust.verifier.tpm.structures import ak_qualified_names, parse_public
from devtrust.verifier.tpm_unavailable import (
    Answer,
    TpmUnavailableReport,
    tpm_unavailable_result,
)

logger = logging.getLogger(__name__)
# An event-log part up to this size is replayed on the event loop (a log after the first
# is a few events, usually none); a longer one (a stream's first, a reboot's) on a thread.
INLINE_LOG_BYTES = 16 * 1024


def may_attest(device_id: DeviceId, record: DeviceRecord | None) -> DeviceRecord:
    """The device's record, as long as it may attest: enrolled, not revoked, not awaiting
    approval. Checked when a stream opens and again before each appraisal."""
    if record is None:
        raise Rejected(f"device {device_id} is not enrolled")
    if record.state is DeviceState.REVOKED:
        raise Rejected(f"device {device_id} is revoked")
    if record.state is DeviceState.PENDING_APPROVAL:
        raise FailedPrecondition(f"device {device_id} awaits operator approval")
    return record


SessionMark = tuple[TpmState | None, Tier | None, tuple[str, PolicyOutcome] | None, bool]


@dataclass
class DeviceSession:
    """What one stream knows about its device between appraisals. The stream's own: the
    attestor changes it only during ``decide``, while the stream waits for it."""

    record: DeviceRecord
    ak_key: AkKey
    qualified_signers: frozenset[bytes]
    refs: RefGroup | None
    tpm: TpmState | None
    # The device's tier before the next appraisal (None: never appraised here).
    previous_tier: Tier | None
    policy_cache: tuple[str, PolicyOutcome] | None = None
    # The first challenge of a stream, and the one after a reboot, ask for the whole log.
    full_log: bool = True
    # The stream's lease on the device (verifier/storage/changes.py SqlStreams):
    # its decisions are stored only while no newer stream of the device, on any process,
    # claimed it. None: no lease (a store without leases, tests).
    lease: int | None = None

    def mark(self) -> SessionMark:
        """What ``decide`` changes, to ``rewind`` to when its decision is not stored."""
        return (self.tpm, self.previous_tier, self.policy_cache, self.full_log)

    def rewind(self, mark: SessionMark) -> None:
        self.tpm, self.previous_tier, self.policy_cache, self.full_log = mark

    @property
    def log_offset(self) -> int:
        """Where the event log the next challenge asks for starts (0: the whole log)."""
        if self.full_log or self.tpm is None or self.tpm.log is None:
            return 0
        return self.tpm.log.offset


class Attestor:
    def __init__(
        self,
        *,
        issuers: DeviceIssuers,
        attestation: AttestationSettings,
        certificates: CertificateSettings,
        limits: LimitsConfig,
        refs: ReferenceValues | None = None,
        policy: PolicyHolder | None = None,
        gpu: GpuAnchorsHolder | None = None,
    ) -> None:
        self._issuers = issuers
        self._settings = attestation
        self._certificates = certificates
        self._limits = limits
        self._refs = refs
        self._policy = policy or PolicyHolder(None)
        # None: GPU reports are not appraised (tests of other parts; the server passes one).
        self._gpu = gpu
        self._policy_runner = PolicyRunner(
            workers=attestation.policy_workers, budget_s=attestation.policy_budget_s
        )
        # Per device: its AK public area and key object (reloading one costs ~90 us).
        self._ak_cache: dict[DeviceId, tuple[bytes, AkKey]] = {}

    def close(self) -> None:
        self._policy_runner.close()

    def open_session(
        self, record: DeviceRecord, *, tpm: TpmState | None, previous_tier: Tier | None
    ) -> DeviceSession:
        """A stream's session, from the device's record and what the verifier remembers of
        its TPM (without the stored log: the first challenge asks for the whole log)."""
        return DeviceSession(
            record=record,
            ak_key=self._ak_key(record.device_id, record.ak_public),
            qualified_signers=ak_qualified_names(
                parse_public(record.ak_public), parse_public(record.ek_public)
            ),
            refs=self._refs_for(record.zone, record.labels),
            tpm=tpm,
            previous_tier=previous_tier,
        )

    def refresh(self, session: DeviceSession, record: DeviceRecord | None) -> None:
        """The device as the verifier knows it now (``record``: what the store found when it
        refused a decision made for the device as its stream knew it, DeviceChanged), not
        as when its stream opened: a device revoked, sent back to approval or given another
        AK meanwhile is refused (its stream ends; nothing of the decision was stored or
        issued), and an operator's new zone or labels apply from the appraisal made again
        now on, whatever the device does with its stream."""
        device_id = session.record.device_id
        record = may_attest(device_id, record)
        if record.ak_public != session.record.ak_public:
            raise Rejected(
                f"device {device_id} enrolled again with another AK: this stream's AK is no "
                "longer the device's; reconnect"
            )
        if (record.zone, record.labels) != (session.record.zone, session.record.labels):
            session.refs = self._refs_for(record.zone, record.labels)
            session.policy_cache = None
            logger.info(
                "device %s now in zone %s labels %s",
                device_id,
                printable(record.zone or "(unassigned)", 64),
                printable(record.labels),
            )
        session.record = record

    def cheap(self, session: DeviceSession, evidence: Answer) -> bool:
        """Whether deciding on ``evidence`` costs little enough to run on the event loop
        (the quote's signature, a few digests, at most ``INLINE_LOG_BYTES`` of event log):
        a stream's later evidence (not its first, nor the first after a reboot: those carry
        the whole log), and the device's cached policy outcome holds for it (its key
        computed as ``appraise`` will), or there is no policy. Otherwise (a policy to
        evaluate, a whole log) the servicer decides on a worker thread. Only where it runs
        depends on this: every check runs either way. A TpmUnavailable costs nothing."""
        if isinstance(evidence, TpmUnavailableReport):
            return True
        if self._gpu is not None and any(r.report for r in evidence.gpu_reports):
            return False  # a chain and a P-384 signature per GPU, RIMs compared
        part = evidence.event_log
        if session.full_log or (part is not None and len(part.data) > INLINE_LOG_BYTES):
            return False
        policy = self._policy.current
        if policy is None:
            return True
        cache, record = session.policy_cache, session.record
        return cache is not None and cache[0] == policy_key(
            PooledPolicy(policy, self._policy_runner), evidence.body_doc, record.zone, record.labels
        )

    def decide(
        self, session: DeviceSession, nonce: Nonce, evidence: Answer, *, now: datetime.datetime
    ) -> Decision:
        """Appraise ``evidence`` against ``nonce``, certify when allowed, and remember in
        ``session`` what the next appraisal needs (TPM state, policy outcome, log offset).
        A TpmUnavailable (the protocol checked its nonce) is decided by ``_tpm_unavailable``."""
        if isinstance(evidence, TpmUnavailableReport):
            return self._tpm_unavailable(session, evidence, now=now)
        settings = self._settings
        record, prior = session.record, session.tpm
        policy = self._policy.current
        expect = Expectation(
            device_id=record.device_id,
            nonce=nonce,
            selection=settings.selection,
            ak_key=session.ak_key,
            staleness=settings.staleness,
            qualified_signers=session.qualified_signers,
            policy=PooledPolicy(policy, self._policy_runner) if policy is not None else None,
            zone=record.zone,
            labels=record.labels,
            policy_cache=session.policy_cache,
            clock=prior.clock if prior else None,
            log=prior.log if prior else None,
            refs=session.refs,
            max_log_bytes=self._limits.max_event_log_bytes,
            max_log_events=self._limits.max_event_log_events,
            gpu=self._gpu.current if self._gpu is not None else None,
            gpu_required=policy is not None
            and policy.requires(GPU_ATTESTATION, record.zone, record.labels),
        )
        appraisal = appraise(evidence, expect, now=now)
        tpm = None
        if appraisal.passed and appraisal.clock is not None:
            tpm = TpmState(
                clock=appraisal.clock,
                log=appraisal.log,
                pcrs=_pcrs_hex(evidence.pcrs),
                log_part=appraisal.log_part,
            )
        withheld = self._withheld(appraisal, evidence, zone=record.zone)
        certificate = None
        if not withheld:
            certificate = self._certify(record, evidence, appraisal, now=now)
        # The device issuing CAs a relying party needs for it, sent with it.
        bundle = self._issuers.bundle_der_at(now) if certificate is not None else ()
        decision = Decision(
            device_id=record.device_id,
            zone=record.zone,
            result=appraisal.result,
            previous_tier=session.previous_tier,
            certificate=certificate,
            withheld=withheld,
            tpm=tpm,
            rebooted=appraisal.rebooted,
            trust_bundle=bundle,
            lease=session.lease,
            assumed=record,
            # Revoked in the store's transaction of this decision (verifier/revocation.py).
            revoke_reason=below_minimum(
                appraisal.result.tier, self._certificates.min_tier_for(record.zone), record.zone
            ),
        )
        session.policy_cache = appraisal.policy_cache
        session.previous_tier = appraisal.result.tier
        if tpm is not None:
            session.tpm = tpm
            if evidence.event_log is not None or appraisal.rebooted:
                session.full_log = appraisal.rebooted
        return decision

    def _tpm_unavailable(
        self, session: DeviceSession, report: TpmUnavailableReport, *, now: datetime.datetime
    ) -> Decision:
        """The decision on a TPM that does not answer: tier none (no certificate; the live
        ones revoked below the zone's minimum, as for any result), the stored TPM state
        untouched (``tpm`` None), the policy outcome and log offset kept for the next
        evidence."""
        record = session.record
        result = tpm_unavailable_result(
            record.device_id, report, now=now, staleness=self._settings.staleness
        )
        decision = Decision(
            device_id=record.device_id,
            zone=record.zone,
            result=result,
            previous_tier=session.previous_tier,
            certificate=None,
            withheld="withheld: the TPM does not answer",
            tpm=None,
            rebooted=False,
            seen=False,
            lease=session.lease,
            assumed=record,
            revoke_reason=below_minimum(
                result.tier, self._certificates.min_tier_for(record.zone), record.zone
            ),
        )
        session.previous_tier = result.tier
        return decision

    def _certify(
        self,
        record: DeviceRecord,
        evidence: Evidence,
        appraisal: Appraisal,
        *,
        now: datetime.datetime,
    ) -> CertificateRecord:
        assert evidence.certify_key is not None
        certs = self._certificates
        cert = self._issuers.signer_at(now).ca.issue_device(
            trust_domain=certs.trust_domain,
            device_id=record.device_id,
            public_key=evidence.certify_key,
            claims=DeviceClaims(tier=appraisal.result.tier, zone=record.zone),
            now=now,
            lifetime=certs.device_lifetime,
        )
        return CertificateRecord(
            serial=serial_of(cert.serial_number),
            device_id=record.device_id,
            kind="device",
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            der=cert.public_bytes(serialization.Encoding.DER),
        )

    def _withheld(self, appraisal: Appraisal, evidence: Evidence, *, zone: str) -> str:
        """Why no certificate is issued for this evidence, or "" when one is. Below the
        zone's minimum tier none is, and the revocation sink revokes the device's live ones
        (verifier/revocation.py)."""
        tier, minimum = appraisal.result.tier, self._certificates.min_tier_for(zone)
        if evidence.certify_key is None:
            return "none asked for"
        if not appraisal.passed:
            return "withheld: the quote did not verify"
        if not appraisal.key_possessed:
            return "withheld: no proof of possession of the key"
        if not tier.meets(minimum):
            setting = (
                f"certificates.zone_min_tier.{printable(zone, 64)}"
                if zone in self._certificates.zone_min_tier
                else "certificates.min_tier"
            )
            return f"withheld: tier {tier.label} is below {setting} {minimum.label}"
        return ""

    def _refs_for(self, zone: str, labels: Mapping[str, str]) -> RefGroup | None:
        return self._refs.for_device(zone, labels) if self._refs else None

    def _ak_key(self, device_id: DeviceId, ak_public: bytes) -> AkKey:
        cached = self._ak_cache.get(device_id)
        if cached is not None and cached[0] == ak_public:
            return cached[1]
        key = parse_public(ak_public).public_key()
        self._ak_cache[device_id] = (ak_public, key)
        return key


def _pcrs_hex(pcrs: Mapping[tuple[int, int], bytes]) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for (alg, index), value in sorted(pcrs.items()):
        out.setdefault(hash_name(alg), {})[index] = value.hex()
    return out
