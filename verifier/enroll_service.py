"""The Enrollment service (DESIGN.md flow 1) over TLS.

Issue 7: zones and labels are assigned by operators and pinned to the device
(verifier/inventory.py); Enroll is rate-limited per peer address and pending enrollments are
capped; a wrong Activate answer leaves the pending enrollment intact; device-supplied text is
escaped where it is logged."""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from devtrust.v1 import common_pb2, enrollment_pb2, enrollment_pb2_grpc
from devtrust.verifier import enrollment
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.config import VerifierConfig
from devtrust.verifier.endorsement import EndorsementStore, load_certificates, parse_ek_certificate
from devtrust.verifier.errors import (
    FailedPrecondition,
    MalformedInput,
    NotFound,
    Rejected,
    ResourceExhausted,
)
from devtrust.verifier.inventory import Assignment, Inventory, apply_inventory, resolve
from devtrust.verifier.logtext import printable
from devtrust.verifier.records import (
    BootstrapToken,
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    PendingEnrollment,
)
from devtrust.verifier.store import Store
from devtrust.verifier.tpm.structures import parse_public
from devtrust.verifier.wire import check_host_facts, load_public_key

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(
        self,
        *,
        store: Store,
        endorsements: EndorsementStore,
        ca: CertificateAuthority,
        config: VerifierConfig,
        clock: Clock,
        inventory: Inventory | None = None,
    ) -> None:
        self._store = store
        self._endorsements = endorsements
        self._ca = ca
        self._config = config
        self._clock = clock
        self._allowed_eks = frozenset(h.lower() for h in config.endorsement.allowed_ek_sha256)
        settings = config.enrollment
        self._limiter = enrollment.RateLimiter(
            rate_per_minute=settings.rate_per_minute, burst=settings.burst
        )
        if inventory is None and settings.inventory is not None:
            inventory = Inventory.load(settings.inventory)
        self._inventory = inventory or Inventory(path=None, devices={})
        if inventory is not None:
            changed = apply_inventory(store, inventory, now=clock())
            logger.info(
                "enrollment inventory %s: %d devices listed, %d known devices reassigned",
                inventory.path,
                len(inventory.devices),
                changed,
            )

    def _check_rate(
        self, context: grpc.aio.ServicerContext[Any, Any], now: datetime.datetime
    ) -> None:
        peer = enrollment.peer_host(context.peer() or "unknown")
        wait = self._limiter.take(peer, now=now.timestamp())
        if wait > 0:
            settings = self._config.enrollment
            raise ResourceExhausted(
                f"too many Enroll calls from {peer} (enrollment.burst {settings.burst}, "
                f"rate_per_minute {settings.rate_per_minute:g}): retry in "
                f"{enrollment.retry_after_s(wait)} s"
            )

    def _token(
        self, request: enrollment_pb2.EnrollRequest, device_id: str, now: datetime.datetime
    ) -> tuple[str, BootstrapToken | None]:
        """The one-time bootstrap token (stored hashed), spent when the proof arrives."""
        if not (request.bootstrap_token or self._config.enrollment.require_token):
            return "", None
        if not request.bootstrap_token:
            raise Rejected(
                f"device {device_id}: this verifier requires a bootstrap token "
                "(enrollment.require_token) and none was given; create one with "
                "`devtrust-verifier token create` and set bootstrap_token in the agent's "
                "configuration"
            )
        token_sha256 = hashlib.sha256(request.bootstrap_token.encode()).hexdigest()
        token = self._store.get_token(token_sha256)
        problem = (
            "unknown bootstrap token"
            if token is None
            else token.problem(device_id=device_id, now=now)
        )
        if problem is not None:
            raise Rejected(f"device {device_id}: {problem}")
        return token_sha256, token

    def _assignment(
        self, device_id: str, existing: DeviceRecord | None, token: BootstrapToken | None
    ) -> Assignment:
        """The operator-assigned zone and labels (precedence in verifier/inventory.py). A
        token counts only while unspent: the one this device spent already assigns nothing."""
        return resolve(
            device_id=device_id,
            listed=self._inventory.get(device_id),
            pinned=(
                None
                if existing is None
                else Assignment(zone=existing.zone, labels=existing.labels, source="device")
            ),
            token=(
                Assignment(zone=token.zone, labels=token.labels, source="token")
                if token is not None and token.used_at is None
                else None
            ),
        )

    async def Enroll(
        self,
        request: enrollment_pb2.EnrollRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> enrollment_pb2.EnrollChallenge:
        now = self._clock()
        self._check_rate(context, now)
        if not request.ek_public:
            raise MalformedInput("EnrollRequest.ek_public is empty")
        check_host_facts(request.host, self._config.limits, where="EnrollRequest.host")
        ek_public = parse_public(request.ek_public)
        if request.ek_certificate:
            # 1. The EK certificate chains to a trusted endorsement root, and 2. the EK
            #    public area the TPM reports holds the certified key.
            ek_cert = parse_ek_certificate(request.ek_certificate)
            intermediates = [
                c
                for i, der in enumerate(request.ek_intermediates)
                for c in load_certificates(der, source=f"ek_intermediates[{i}]")
            ]
            self._endorsements.verify(ek_cert, intermediates, now=now)
            enrollment.check_ek_public(ek_public, ek_cert)
            ek_key = ek_public.public_key()
            device_id = enrollment.device_id_for(ek_key)
        else:
            # 1-2. No EK certificate (some cloud vTPMs): the EK key itself is allowlisted.
            enrollment.check_ek_attributes(ek_public)
            ek_key = ek_public.public_key()
            device_id = enrollment.device_id_for(ek_key)
            if device_id not in self._allowed_eks:
                raise Rejected(
                    f"no EK certificate, and the EK public key (sha256 {device_id}) is not in "
                    "endorsement.allowed_ek_sha256"
                )
        # 3. The AK is a restricted signing key that never leaves the TPM.
        ak = enrollment.parse_ak(request.ak_public)
        enrollment.check_ak(ak)
        load_public_key(request.channel_key_spki, field="EnrollRequest.channel_key_spki")
        existing = self._store.get_device(device_id)
        if existing is not None and existing.state is DeviceState.REVOKED:
            raise Rejected(f"device {device_id} is revoked")
        token_sha256, token = self._token(request, device_id, now)
        # 4. Zone and labels: the operator's, pinned to a known device; never the host's claim.
        assignment = self._assignment(device_id, existing, token)
        host = request.host
        if (host.zone or host.labels) and not assignment.same(host.zone, host.labels):
            logger.info(
                "device %s claims zone %s labels %s; assigned zone %s labels %s (%s)",
                device_id,
                printable(host.zone, 64),
                printable(",".join(f"{k}={v}" for k, v in sorted(host.labels.items()))),
                printable(assignment.zone or "(unassigned)", 64),
                assignment.labels,
                assignment.source,
            )
        # 5. Credential challenge for TPM2_ActivateCredential, answerable once, for 5 minutes.
        challenge = enrollment.make_challenge(request.ek_public, ak.name)
        enrollment_id = enrollment.new_enrollment_id()
        record = DeviceRecord(
            device_id=device_id,
            state=DeviceState.PENDING_APPROVAL,
            ek_certificate=request.ek_certificate,
            ek_public=request.ek_public,
            ak_public=request.ak_public,
            ak_name=ak.name.hex(),
            host={
                "hostname": host.hostname,
                "os_release": host.os_release,
                "kernel": host.kernel,
                "machine_id": host.machine_id,
                "agent_version": host.agent_version,
                # What the host says of itself: shown to operators, never used.
                "claimed_zone": host.zone,
                "claimed_labels": dict(host.labels),
            },
            zone=assignment.zone,
            labels=dict(assignment.labels),
            enrolled_at=now,
        )
        settings = self._config.enrollment
        self._store.put_enrollment(
            PendingEnrollment(
                enrollment_id=enrollment_id,
                record=record,
                secret=challenge.secret,
                channel_key_spki=request.channel_key_spki,
                expires_at=now + enrollment.ENROLLMENT_TTL,
                token_sha256=token_sha256,
            ),
            now=now,
            max_per_device=settings.max_pending_per_device,
            max_total=settings.max_pending,
        )
        logger.info(
            "enroll challenge device=%s ak=%s host=%s zone=%s",
            device_id,
            ak.name.hex()[:16],
            printable(host.hostname, 128),
            printable(assignment.zone or "(unassigned)", 64),
        )
        return enrollment_pb2.EnrollChallenge(
            enrollment_id=enrollment_id,
            credential_blob=challenge.credential_blob,
            encrypted_secret=challenge.encrypted_secret,
            device_id=device_id,
        )

    async def Activate(
        self,
        request: enrollment_pb2.ActivateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> enrollment_pb2.ActivateResponse:
        now = self._clock()
        # 1. Look the challenge up; nothing is spent until its proof checks out, so a wrong
        #    answer (from anyone who learnt the enrollment id) cannot void it.
        pending = self._store.get_enrollment(request.enrollment_id)
        if pending is None:
            shown = (
                request.enrollment_id
                if enrollment.ENROLLMENT_ID_RE.fullmatch(request.enrollment_id)
                else "(not an enrollment id)"
            )
            raise NotFound(
                f"no pending enrollment {shown} (answered already, expired, or never issued)"
            )
        if now > pending.expires_at:
            self._store.take_enrollment(pending.enrollment_id)
            raise FailedPrecondition(
                f"enrollment {pending.enrollment_id} expired at {pending.expires_at.isoformat()}"
            )
        # 2. The proof: only the TPM holding this EK and AK recovered the secret.
        enrollment.check_proof(
            request.proof,
            secret=pending.secret,
            enrollment_id=pending.enrollment_id,
            channel_key_spki=pending.channel_key_spki,
        )
        # 3. Spend the challenge atomically: of two correct answers, one wins.
        if not self._store.take_enrollment(pending.enrollment_id):
            raise NotFound(f"enrollment {pending.enrollment_id} was answered already")
        device_id = pending.record.device_id
        existing = self._store.get_device(device_id)
        if existing is not None and existing.state is DeviceState.REVOKED:
            raise Rejected(f"device {device_id} is revoked")
        # 4. The assignment again: the device may have been enrolled or moved meanwhile.
        token = self._store.get_token(pending.token_sha256) if pending.token_sha256 else None
        assignment = self._assignment(device_id, existing, token)
        if pending.token_sha256 and not self._store.use_token(
            pending.token_sha256, device_id=device_id, now=now
        ):
            raise Rejected(f"device {device_id}: bootstrap token already used")
        state = self._state_after_proof(pending.record, existing)
        record = replace(
            pending.record, state=state, zone=assignment.zone, labels=dict(assignment.labels)
        )
        self._store.save_device(record, now=now, event=f"enrolled:{state.value}")
        response = enrollment_pb2.ActivateResponse(
            device_id=record.device_id,
            ca_chain=[self._ca_der()],
            state=(
                common_pb2.DEVICE_STATE_ENROLLED
                if state is DeviceState.ENROLLED
                else common_pb2.DEVICE_STATE_PENDING_APPROVAL
            ),
        )
        if state is DeviceState.ENROLLED:
            key = load_public_key(pending.channel_key_spki, field="channel key")
            lifetime = datetime.timedelta(seconds=self._config.certificates.channel_lifetime_s)
            cert = self._ca.issue_client(
                kind="agent",
                trust_domain=self._config.trust_domain,
                name=record.device_id,
                public_key=key,
                now=now,
                lifetime=lifetime,
            )
            der = cert.public_bytes(serialization.Encoding.DER)
            self._store.record_certificate(
                CertificateRecord(
                    serial=f"{cert.serial_number:x}",
                    device_id=record.device_id,
                    kind="channel",
                    not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc,
                    der=der,
                )
            )
            response.channel_certificate = der
        logger.info(
            "enrolled device=%s state=%s zone=%s (%s)",
            record.device_id,
            state.value,
            printable(record.zone or "(unassigned)", 64),
            assignment.source,
        )
        return response

    def _state_after_proof(
        self, record: DeviceRecord, existing: DeviceRecord | None
    ) -> DeviceState:
        """Enrolled at once, or pending until an operator approves this device with this AK."""
        if not self._config.enrollment.require_approval:
            return DeviceState.ENROLLED
        approved = (
            existing is not None
            and existing.state is DeviceState.ENROLLED
            and existing.ak_name == record.ak_name
        )
        return DeviceState.ENROLLED if approved else DeviceState.PENDING_APPROVAL

    def _ca_der(self) -> bytes:
        return self._ca.cert.public_bytes(serialization.Encoding.DER)
