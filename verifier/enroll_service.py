"""The Enrollment service (DESIGN.md flow 1) over TLS.

Issue 7: zones and labels are assigned by operators and pinned to the device
(verifier/inventory.py); Enroll is rate-limited per peer address and pending enrollments are
capped; a wrong Activate answer leaves the pending enrollment intact; device-supplied text is
escaped where it is logged.

Messages are converted at the edge (verifier/wire_enroll.py); the methods below work on the
frozen values of verifier/enrollment.py and the repositories of verifier/storage.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
from cryptography.hazmat.primitives import serialization

from devtrust.core.errors import DevtrustError
from devtrust.core.ids import DeviceId, serial_of
from devtrust.v1 import enrollment_pb2, enrollment_pb2_grpc
from devtrust.verifier import enrollment, wire_enroll
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.endorsement import EndorsementStore, load_certificates, parse_ek_certificate
from devtrust.verifier.enrollment import (
    Activated,
    ActivateRequest,
    EnrollRequest,
    IssuedChallenge,
)
from devtrust.verifier.errors import FailedPrecondition, NotFound, Rejected, ResourceExhausted
from devtrust.verifier.inventory import Assignment, Inventory, apply_inventory, resolve
from devtrust.verifier.logtext import printable
from devtrust.verifier.records import (
    BootstrapToken,
    CertificateRecord,
    DeviceRecord,
    DeviceState,
    PendingEnrollment,
)
from devtrust.verifier.settings import CertificateSettings, EnrollmentSettings
from devtrust.verifier.storage import Repositories
from devtrust.verifier.store_health import is_outage
from devtrust.verifier.tpm.structures import parse_public
from devtrust.verifier.wire import load_public_key

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are on
    from devtrust.verifier.metrics import VerifierMetrics

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
Context = grpc.aio.ServicerContext[Any, Any]


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    """Call ``start`` once before serving: it applies the inventory to known devices."""

    def __init__(
        self,
        *,
        repos: Repositories,
        endorsements: EndorsementStore,
        ca: CertificateAuthority,
        settings: EnrollmentSettings,
        certificates: CertificateSettings,
        limits: LimitsConfig,
        clock: Clock,
        inventory: Inventory | None = None,
        metrics: VerifierMetrics | None = None,
    ) -> None:
        self._repos = repos
        # Enrollments by outcome, channel certificates issued (verifier/metrics.py).
        self._metrics = metrics
        self._endorsements = endorsements
        self._ca = ca
        self._settings = settings
        self._certificates = certificates
        self._limits = limits
        self._clock = clock
        self._limiter = enrollment.RateLimiter(
            rate_per_minute=settings.rate_per_minute, burst=settings.burst
        )
        if inventory is None and settings.inventory is not None:
            inventory = Inventory.load(settings.inventory)
        self._listed = inventory is not None
        self._inventory = inventory or Inventory(path=None, devices={})

    async def start(self) -> None:
        """Give every known device the inventory lists its inventory zone and labels."""
        if not self._listed:
            return
        inventory = self._inventory
        changed = await apply_inventory(self._repos.devices, inventory, now=self._clock())
        logger.info(
            "enrollment inventory %s: %d devices listed, %d known devices reassigned",
            inventory.path,
            len(inventory.devices),
            changed,
        )

    # --- the gRPC methods: convert, call the flow, convert back ----------------------------

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: Context
    ) -> enrollment_pb2.EnrollChallenge:
        try:
            now = self._clock()
            self._check_rate(context, now)
            enroll = wire_enroll.enroll_request_from_wire(request, self._limits)
            return wire_enroll.challenge_to_wire(await self.enroll(enroll, now=now))
        except DevtrustError as exc:
            self._refused(exc)
            raise

    async def Activate(
        self, request: enrollment_pb2.ActivateRequest, context: Context
    ) -> enrollment_pb2.ActivateResponse:
        try:
            answer = wire_enroll.activate_request_from_wire(request)
            return wire_enroll.activated_to_wire(await self.activate(answer, now=self._clock()))
        except DevtrustError as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: DevtrustError) -> None:
        """Counted: an enrollment call refused (a transport or database failure is not a
        refusal: it is not a DevtrustError the device caused, and is not counted)."""
        if self._metrics is not None and not is_outage(exc):
            limited = isinstance(exc, ResourceExhausted)
            self._metrics.enrolled("rate_limited" if limited else "refused")

    # --- the flow ----------------------------------------------------------------------------

    async def enroll(self, request: EnrollRequest, *, now: datetime.datetime) -> IssuedChallenge:
        """Steps 1-5 of DESIGN.md flow 1 on the verifier's side: the EK and AK checked, the
        zone and labels assigned, a credential challenge stored and returned."""
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
            if device_id not in self._settings.allowed_ek_sha256:
                raise Rejected(
                    f"no EK certificate, and the EK public key (sha256 {device_id}) is not in "
                    "endorsement.allowed_ek_sha256"
                )
        # 3. The AK is a restricted signing key that never leaves the TPM.
        ak = enrollment.parse_ak(request.ak_public)
        enrollment.check_ak(ak)
        load_public_key(request.channel_key_spki, field="EnrollRequest.channel_key_spki")
        existing = await self._repos.devices.get(device_id)
        if existing is not None and existing.state is DeviceState.REVOKED:
            raise Rejected(f"device {device_id} is revoked")
        token_sha256, token = await self._token(request.bootstrap_token, device_id, now)
        # 4. Zone and labels: the operator's, pinned to a known device; never the host's claim.
        assignment = self._assignment(device_id, existing, token)
        host = request.host
        if (host.zone or host.labels) and not assignment.same(host.zone, dict(host.labels)):
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
            host=host.as_record(),
            zone=assignment.zone,
            labels=dict(assignment.labels),
            enrolled_at=now,
        )
        await self._repos.enrollments.put(
            PendingEnrollment(
                enrollment_id=enrollment_id,
                record=record,
                secret=challenge.secret,
                channel_key_spki=request.channel_key_spki,
                expires_at=now + enrollment.ENROLLMENT_TTL,
                token_sha256=token_sha256,
            ),
            now=now,
            max_per_device=self._settings.max_pending_per_device,
            max_total=self._settings.max_pending,
        )
        logger.info(
            "enroll challenge device=%s ak=%s host=%s zone=%s",
            device_id,
            ak.name.hex()[:16],
            printable(host.hostname, 128),
            printable(assignment.zone or "(unassigned)", 64),
        )
        return IssuedChallenge(
            enrollment_id=enrollment_id,
            device_id=device_id,
            credential_blob=challenge.credential_blob,
            encrypted_secret=challenge.encrypted_secret,
        )

    async def activate(self, answer: ActivateRequest, *, now: datetime.datetime) -> Activated:
        """The proof checked, the challenge spent, the device saved: enrolled (with its
        channel certificate) or pending approval."""
        repos = self._repos
        # 1. Look the challenge up; nothing is spent until its proof checks out, so a wrong
        #    answer (from anyone who learnt the enrollment id) cannot void it.
        pending = await repos.enrollments.get(answer.enrollment_id)
        if pending is None:
            shown = (
                answer.enrollment_id
                if enrollment.ENROLLMENT_ID_RE.fullmatch(answer.enrollment_id)
                else "(not an enrollment id)"
            )
            raise NotFound(
                f"no pending enrollment {shown} (answered already, expired, or never issued)"
            )
        if now > pending.expires_at:
            await repos.enrollments.take(pending.enrollment_id)
            raise FailedPrecondition(
                f"enrollment {pending.enrollment_id} expired at {pending.expires_at.isoformat()}"
            )
        # 2. The proof: only the TPM holding this EK and AK recovered the secret.
        enrollment.check_proof(
            answer.proof,
            secret=pending.secret,
            enrollment_id=pending.enrollment_id,
            channel_key_spki=pending.channel_key_spki,
        )
        # 3. One transaction (review H3): take the challenge (of two correct answers, one
        #    wins), read the device again (a revoked one is refused, even when its
        #    revocation commits on another replica while this runs), take the assignment
        #    again (the device may have been enrolled or moved meanwhile), spend the token,
        #    save the device and record its certificate, signed beforehand. On a refusal
        #    nothing is written.
        device_id = pending.record.device_id
        certificate = self._channel_certificate(device_id, pending.channel_key_spki, now=now)
        assignments: list[Assignment] = []

        def decide(existing: DeviceRecord | None, token: BootstrapToken | None) -> DeviceRecord:
            assignment = self._assignment(device_id, existing, token)
            assignments.append(assignment)
            return replace(
                pending.record,
                state=self._state_after_proof(pending.record, existing),
                zone=assignment.zone,
                labels=dict(assignment.labels),
            )

        record = await repos.devices.activate(
            pending.enrollment_id,
            device_id=device_id,
            token_sha256=pending.token_sha256,
            decide=decide,
            certificate=certificate,
            now=now,
        )
        state = record.state
        channel_certificate = certificate.der if state is DeviceState.ENROLLED else b""
        if self._metrics is not None:
            self._metrics.enrolled(state.value)
            if state is DeviceState.ENROLLED:  # stored with it (storage/devices.py)
                self._metrics.certificates_issued.labels("channel").inc()
        logger.info(
            "enrolled device=%s state=%s zone=%s (%s)",
            record.device_id,
            state.value,
            printable(record.zone or "(unassigned)", 64),
            assignments[-1].source,
        )
        return Activated(
            device_id=record.device_id,
            state=state,
            ca_chain=(self._ca.cert.public_bytes(serialization.Encoding.DER),),
            channel_certificate=channel_certificate,
        )

    # --- its parts ---------------------------------------------------------------------------

    def _check_rate(self, context: Context, now: datetime.datetime) -> None:
        peer = enrollment.peer_host(context.peer() or "unknown")
        wait = self._limiter.take(peer, now=now.timestamp())
        if wait > 0:
            settings = self._settings
            raise ResourceExhausted(
                f"too many Enroll calls from {peer} (enrollment.burst {settings.burst}, "
                f"rate_per_minute {settings.rate_per_minute:g}): retry in "
                f"{enrollment.retry_after_s(wait)} s"
            )

    async def _token(
        self, bootstrap_token: str, device_id: DeviceId, now: datetime.datetime
    ) -> tuple[str, BootstrapToken | None]:
        """The one-time bootstrap token (stored hashed), spent when the proof arrives."""
        if not (bootstrap_token or self._settings.require_token):
            return "", None
        if not bootstrap_token:
            raise Rejected(
                f"device {device_id}: this verifier requires a bootstrap token "
                "(enrollment.require_token) and none was given; create one with "
                "`devtrust token create` and set bootstrap_token in the agent's "
                "configuration"
            )
        token_sha256 = hashlib.sha256(bootstrap_token.encode()).hexdigest()
        token = await self._repos.tokens.get(token_sha256)
        problem = (
            "unknown bootstrap token"
            if token is None
            else token.problem(device_id=device_id, now=now)
        )
        if problem is not None:
            raise Rejected(f"device {device_id}: {problem}")
        return token_sha256, token

    def _assignment(
        self, device_id: DeviceId, existing: DeviceRecord | None, token: BootstrapToken | None
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

    def _state_after_proof(
        self, record: DeviceRecord, existing: DeviceRecord | None
    ) -> DeviceState:
        """Enrolled at once, or pending until an operator approves this device with this AK."""
        if not self._settings.require_approval:
            return DeviceState.ENROLLED
        approved = (
            existing is not None
            and existing.state is DeviceState.ENROLLED
            and existing.ak_name == record.ak_name
        )
        return DeviceState.ENROLLED if approved else DeviceState.PENDING_APPROVAL

    def _channel_certificate(
        self, device_id: DeviceId, channel_key_spki: bytes, *, now: datetime.datetime
    ) -> CertificateRecord:
        """The agent's channel certificate for the key it enrolled with, to record (and to
        answer, DER) when the device ends up enrolled."""
        key = load_public_key(channel_key_spki, field="channel key")
        cert = self._ca.issue_client(
            kind="agent",
            trust_domain=self._certificates.trust_domain,
            name=device_id,
            public_key=key,
            now=now,
            lifetime=self._certificates.channel_lifetime,
        )
        return CertificateRecord(
            serial=serial_of(cert.serial_number),
            device_id=device_id,
            kind="channel",
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            der=cert.public_bytes(serialization.Encoding.DER),
        )
