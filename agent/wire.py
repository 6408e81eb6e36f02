"""The agent's messages at the gRPC edge (STYLE 4), in both directions: the only agent module
that builds or reads a protobuf message of the streams and calls (``messages`` holds the
values the rest of the agent works with).

Attestation: Hello, Evidence and PostureChanged out as AgentMessages; a VerifierMessage in as
its Result (an ``AttestationResult``: the tier as ``devtrust.core.tier.Tier``, the certificate
parsed) and its next ``Challenge``. Enrollment: the EnrollRequest and ActivateRequest out, the
EnrollChallenge and ActivateResponse in. What does not parse raises ``MalformedMessage``.

The evidence body is the one exception, on purpose. Its parts (HostFacts, OsPosture, GpuState,
built by the collectors and returned by ``interfaces.HostProbe``) are protobuf messages from
the start, and ``evidence.evidence_body`` serializes them once, deterministically. Those bytes
are what the TPM quote binds (qualifying data = sha256(nonce || sha256(body))) and what the
verifier's policy reads, field for field: the body is the contract, and its protobuf schema
is its definition. A domain mirror of its ninety-odd fields would be converted on every challenge,
by every simulated client, only to be turned back into the same bytes, and would be a second
schema free to drift from the one the verifier reads. Here the body is opaque bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from devtrust.agent.errors import MalformedMessage
from devtrust.agent.messages import (
    Activated,
    AttestationResult,
    Challenge,
    Claim,
    CredentialChallenge,
    Evidence,
    Finding,
    IssuedCertificate,
    TpmUnavailableNote,
    Verdict,
)
from devtrust.core.ids import Nonce, Serial, parse_device_id, serial_of
from devtrust.core.tier import Tier
from devtrust.v1 import attestation_pb2, common_pb2, enrollment_pb2

_TIERS: dict[int, Tier] = {
    common_pb2.TIER_NONE: Tier.NONE,
    common_pb2.TIER_AFFIRMING: Tier.AFFIRMING,
    common_pb2.TIER_WARNING: Tier.WARNING,
    common_pb2.TIER_CONTRAINDICATED: Tier.CONTRAINDICATED,
}
_SEVERITIES: dict[int, str] = {
    common_pb2.SEVERITY_INFO: "info",
    common_pb2.SEVERITY_WARNING: "warning",
    common_pb2.SEVERITY_CONTRAINDICATED: "contraindicated",
}


# --- the attestation stream: out -------------------------------------------------------------


def hello_to_wire(agent_version: str) -> attestation_pb2.AgentMessage:
    return attestation_pb2.AgentMessage(hello=attestation_pb2.Hello(agent_version=agent_version))


def evidence_to_wire(evidence: Evidence) -> attestation_pb2.AgentMessage:
    """The Evidence message: the quote, the PCR values it covers by bank, the body as the
    bytes quoted, and the event log part when there is one."""
    banks: dict[str, common_pb2.PcrBank] = {}
    for (bank, index), value in evidence.quote.pcrs.items():
        banks.setdefault(bank, common_pb2.PcrBank(hash_alg=bank)).values[index] = value
    msg = attestation_pb2.Evidence(
        nonce=evidence.nonce,
        quote_attest=evidence.quote.attest,
        quote_signature=evidence.quote.signature,
        pcrs=list(banks.values()),
        body=evidence.body,
    )
    if evidence.event_log is not None:
        log = evidence.event_log
        msg.event_log.CopyFrom(
            attestation_pb2.EventLogChunk(
                offset=log.offset, data=log.data, total_size=log.total_size
            )
        )
    return attestation_pb2.AgentMessage(evidence=msg)


# The verifier refuses a TpmUnavailable.detail over 1024 bytes (verifier/wire_attest.py): a
# TSS error text is one line well under this.
TPM_DETAIL_MAX_CHARS = 240


def tpm_unavailable_to_wire(note: TpmUnavailableNote) -> attestation_pb2.AgentMessage:
    """TpmUnavailable for the challenge's nonce, its detail cut to ``TPM_DETAIL_MAX_CHARS``
    (at most 4 bytes a character in UTF-8: under the verifier's bound)."""
    return attestation_pb2.AgentMessage(
        tpm_unavailable=attestation_pb2.TpmUnavailable(
            nonce=note.nonce, detail=note.detail[:TPM_DETAIL_MAX_CHARS]
        )
    )


def posture_changed_to_wire(signals: Sequence[str]) -> attestation_pb2.AgentMessage:
    return attestation_pb2.AgentMessage(
        posture_changed=attestation_pb2.PostureChanged(signals=list(signals))
    )


# --- the attestation stream: in --------------------------------------------------------------


def verifier_message_from_wire(
    msg: object,
) -> tuple[AttestationResult | None, Challenge | None]:
    """A VerifierMessage as its Result and its Challenge, either or both (the Result is for
    the last Evidence, so the caller handles it first)."""
    if not isinstance(msg, attestation_pb2.VerifierMessage):
        raise MalformedMessage(f"expected a VerifierMessage, got {type(msg).__name__}")
    result = result_from_wire(msg.result) if msg.HasField("result") else None
    challenge = challenge_from_wire(msg.challenge) if msg.HasField("challenge") else None
    return result, challenge


def challenge_from_wire(msg: attestation_pb2.Challenge) -> Challenge:
    return Challenge(
        nonce=Nonce(msg.nonce),
        selection=tuple((s.hash_alg, tuple(s.pcrs)) for s in msg.pcr_selection),
        event_log_from=msg.event_log.from_offset if msg.event_log.wanted else None,
    )


def result_from_wire(msg: attestation_pb2.Result) -> AttestationResult:
    return AttestationResult(
        trust=verdict_from_wire(msg.trust),
        certificate=certificate_from_wire(msg.certificate) if msg.HasField("certificate") else None,
        next_challenge_in=(
            msg.next_challenge_in.ToTimedelta() if msg.HasField("next_challenge_in") else None
        ),
        revoked_serials=tuple(_serial(s) for s in msg.revoked_serials),
    )


def _serial(text: str) -> Serial:
    """A serial as records write it (``serial_of``), whatever zeros or case it came with."""
    try:
        return serial_of(int(text, 16))
    except ValueError:
        raise MalformedMessage(
            f"the verifier sent a revoked serial that is not hex: {text[:40]!r}"
        ) from None


def tier_from_wire(value: int) -> Tier:
    """The tier a message names; unspecified or unknown is ``Tier.NONE`` (no claim made)."""
    return _TIERS.get(value, Tier.NONE)


def verdict_from_wire(msg: common_pb2.TrustResult) -> Verdict:
    return Verdict(
        device_id=msg.device_id,
        tier=tier_from_wire(msg.tier),
        score=msg.score,
        claims=tuple(Claim(c.name, c.value, tier_from_wire(c.tier)) for c in msg.claims),
        findings=tuple(
            Finding(
                id=f.id,
                severity=_SEVERITIES.get(f.severity, "unspecified"),
                claim=f.claim,
                message=f.message,
                expected=f.expected,
                found=f.found,
                subject=f.subject,
            )
            for f in msg.findings
        ),
    )


def certificate_from_wire(msg: common_pb2.DeviceCertificate) -> IssuedCertificate:
    try:
        cert = x509.load_der_x509_certificate(msg.certificate_der)
    except ValueError as exc:
        raise MalformedMessage(
            f"the verifier sent a device certificate that does not parse ({exc})"
        ) from None
    try:
        bundle = tuple(x509.load_der_x509_certificate(der) for der in msg.trust_bundle_der)
    except ValueError as exc:
        raise MalformedMessage(
            f"the verifier sent a trust bundle certificate that does not parse ({exc})"
        ) from None
    return IssuedCertificate(
        certificate=cert,
        der=msg.certificate_der,
        serial=Serial(msg.serial_hex),
        trust_bundle=bundle,
    )


# --- enrollment ------------------------------------------------------------------------------


def enroll_request_to_wire(
    *,
    ek_certificate: bytes | None,
    ek_public: bytes,
    ak_public: bytes,
    host: common_pb2.HostFacts,
    bootstrap_token: str,
    channel_key_spki: bytes,
) -> enrollment_pb2.EnrollRequest:
    """The request to enroll: the TPM's EK (its certificate, when it has one) and AK, what the
    host says of itself, the bootstrap token and the channel key to certify."""
    return enrollment_pb2.EnrollRequest(
        ek_certificate=ek_certificate or b"",
        ek_public=ek_public,
        ak_public=ak_public,
        host=host,
        bootstrap_token=bootstrap_token,
        channel_key_spki=channel_key_spki,
    )


def credential_challenge_from_wire(msg: enrollment_pb2.EnrollChallenge) -> CredentialChallenge:
    return CredentialChallenge(
        enrollment_id=msg.enrollment_id,
        credential_blob=msg.credential_blob,
        encrypted_secret=msg.encrypted_secret,
    )


def activate_request_to_wire(*, enrollment_id: str, proof: bytes) -> enrollment_pb2.ActivateRequest:
    return enrollment_pb2.ActivateRequest(enrollment_id=enrollment_id, proof=proof)


def activated_from_wire(msg: enrollment_pb2.ActivateResponse) -> Activated:
    """The verifier's answer; the device id is checked here, as it names files and is signed
    into every proof of possession."""
    try:
        device_id = parse_device_id(msg.device_id)
    except ValueError as exc:
        raise MalformedMessage(f"the verifier's enrollment answer: {exc}") from None
    return Activated(
        device_id=device_id,
        pending_approval=msg.state == common_pb2.DEVICE_STATE_PENDING_APPROVAL,
        channel_certificate=msg.channel_certificate,
        ca_chain=tuple(msg.ca_chain),
    )
