"""The Enrollment service (DESIGN.md flow 1) over TLS."""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from protos.devtrust.v1 import common_pb2, enrollment_pb2, enrollment_pb2_grpc
from verifier import enrollment
from verifier.ca import CertificateAuthority
from verifier.config import VerifierConfig
from verifier.endorsement import EndorsementStore, load_certificates, parse_ek_certificate
from verifier.errors import FailedPrecondition, MalformedInput, NotFound, Rejected
from verifier.store import (
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    PendingEnrollment,
    Store,
)
from verifier.tpm.structures import parse_public
from verifier.wire import load_public_key

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
    ) -> None:
        self._store = store
        self._endorsements = endorsements
        self._ca = ca
        self._config = config
        self._clock = clock
        self._allowed_eks = frozenset(h.lower() for h in config.endorsement.allowed_ek_sha256)

    async def Enroll(
        self,
        request: enrollment_pb2.EnrollRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> enrollment_pb2.EnrollChallenge:
        now = self._clock()
        if not request.ek_public:
            raise MalformedInput("EnrollRequest.ek_public is empty")
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
        # One-time bootstrap token (stored hashed), spent when the proof arrives.
        token_sha256 = ""
        if request.bootstrap_token or self._config.enrollment.require_token:
            token_sha256 = hashlib.sha256(request.bootstrap_token.encode()).hexdigest()
            problem = self._store.token_problem(token_sha256, now=now)
            if problem is not None:
                raise Rejected(f"device {device_id}: {problem}")
        # 4. Credential challenge for TPM2_ActivateCredential, answerable once, for 5 minutes.
        challenge = enrollment.make_challenge(request.ek_public, ak.name)
        enrollment_id = enrollment.new_enrollment_id()
        host = request.host
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
            },
            zone=host.zone,
            labels=dict(host.labels),
            enrolled_at=now,
        )
        self._store.put_enrollment(
            PendingEnrollment(
                enrollment_id=enrollment_id,
                record=record,
                secret=challenge.secret,
                channel_key_spki=request.channel_key_spki,
                expires_at=now + enrollment.ENROLLMENT_TTL,
                token_sha256=token_sha256,
            )
        )
        logger.info(
            "enroll challenge device=%s ak=%s host=%s", device_id, ak.name.hex()[:16], host.hostname
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
        pending = self._store.take_enrollment(request.enrollment_id)
        if pending is None:
            raise NotFound(
                f"no pending enrollment {request.enrollment_id!r} (answered already, "
                "or never issued)"
            )
        if now > pending.expires_at:
            raise FailedPrecondition(
                f"enrollment {request.enrollment_id} expired at {pending.expires_at.isoformat()}"
            )
        enrollment.check_proof(
            request.proof,
            secret=pending.secret,
            enrollment_id=pending.enrollment_id,
            channel_key_spki=pending.channel_key_spki,
        )
        if pending.token_sha256 and not self._store.use_token(
            pending.token_sha256, device_id=pending.record.device_id, now=now
        ):
            raise Rejected(f"device {pending.record.device_id}: bootstrap token already used")
        state = self._state_after_proof(pending.record)
        record = DeviceRecord(**{**pending.record.__dict__, "state": state})
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
        logger.info("enrolled device=%s state=%s", record.device_id, state.value)
        return response

    def _state_after_proof(self, record: DeviceRecord) -> DeviceState:
        """Enrolled at once, or pending until an operator approves this device with this AK."""
        if not self._config.enrollment.require_approval:
            return DeviceState.ENROLLED
        existing = self._store.get_device(record.device_id)
        approved = (
            existing is not None
            and existing.state is DeviceState.ENROLLED
            and existing.ak_name == record.ak_name
        )
        return DeviceState.ENROLLED if approved else DeviceState.PENDING_APPROVAL

    def _ca_der(self) -> bytes:
        return self._ca.cert.public_bytes(serialization.Encoding.DER)
