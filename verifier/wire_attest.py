"""The attestation stream's messages at the gRPC edge (STYLE 4), in both directions.

In: an AgentMessage becomes a protocol event (verifier/stream.py) by its kind; its content
(the evidence or TpmUnavailable, the posture signals) is converted only once the protocol has
accepted it (``evidence_of``, ``posture_signals_of``, by the converters of verifier/wire.py).
Out: a challenge's nonce, a Decision and its certificate become the VerifierMessage, which
carries a Result, the next Challenge, or both. The servicer builds no message itself.
"""

from __future__ import annotations

import datetime

from devtrust.core.ids import Nonce
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier import wire
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.decision import Decision
from devtrust.verifier.records import CertificateRecord
from devtrust.verifier.stream import (
    EmptyMessage,
    Event,
    EvidenceReceived,
    HelloReceived,
    PostureChanged,
    TpmUnavailableReceived,
)
from devtrust.verifier.tpm.structures import PcrSelect
from devtrust.verifier.tpm_unavailable import Answer, TpmUnavailableReport


def agent_event(msg: attestation_pb2.AgentMessage, now: float) -> Event:
    """The protocol event for a received message: its kind and when it arrived."""
    kind = msg.WhichOneof("kind")
    if kind == "hello":
        return HelloReceived(now, agent_version=msg.hello.agent_version)
    if kind == "evidence":
        return EvidenceReceived(now)
    if kind == "posture_changed":
        return PostureChanged(now)
    if kind == "tpm_unavailable":
        return TpmUnavailableReceived(now, nonce=msg.tpm_unavailable.nonce)
    return EmptyMessage(now)


def evidence_of(msg: attestation_pb2.AgentMessage, limits: LimitsConfig) -> Answer:
    """What answers the challenge in a message the protocol accepted as its answer: the
    Evidence, or TpmUnavailable, validated (MalformedInput, LimitExceeded)."""
    if msg.WhichOneof("kind") == "tpm_unavailable":
        return TpmUnavailableReport.of(msg.tpm_unavailable.detail)
    return wire.evidence_from_wire(msg.evidence, limits)


def posture_signals_of(msg: attestation_pb2.AgentMessage, limits: LimitsConfig) -> tuple[str, ...]:
    """The signals a PostureChanged message names, bounded in number (only logged)."""
    return wire.posture_signals_from_wire(msg.posture_changed, limits)


def challenge_to_wire(
    nonce: Nonce, *, selection: tuple[PcrSelect, ...], log_offset: int
) -> attestation_pb2.Challenge:
    """A challenge for a quote over ``selection`` and the event log from ``log_offset`` (0:
    the whole log)."""
    return attestation_pb2.Challenge(
        nonce=nonce,
        pcr_selection=wire.selection_to_wire(selection),
        event_log=attestation_pb2.EventLogRequest(wanted=True, from_offset=log_offset),
    )


def certificate_to_wire(
    cert: CertificateRecord, trust_bundle: tuple[bytes, ...] = ()
) -> common_pb2.DeviceCertificate:
    """A device certificate with the bundle that verifies it: device issuing CAs only."""
    return common_pb2.DeviceCertificate(
        certificate_der=cert.der,
        trust_bundle_der=trust_bundle,
        serial_hex=cert.serial,
        not_before=wire.timestamp(cert.not_before),
        not_after=wire.timestamp(cert.not_after),
    )


def decision_to_wire(decision: Decision, *, next_challenge_in: float) -> attestation_pb2.Result:
    """The Result the agent gets: the trust result, the certificate issued if one was, the
    device's revoked certificates it must stop using, and when the next challenge comes (in
    seconds; 0 when it travels with this Result)."""
    result = attestation_pb2.Result(trust=wire.result_to_wire(decision.result))
    if decision.certificate is not None:
        result.certificate.CopyFrom(
            certificate_to_wire(decision.certificate, decision.trust_bundle)
        )
    result.revoked_serials.extend(decision.revoked_serials)
    result.next_challenge_in.FromTimedelta(datetime.timedelta(seconds=next_challenge_in))
    return result


def verifier_message(
    *,
    result: attestation_pb2.Result | None = None,
    challenge: attestation_pb2.Challenge | None = None,
) -> attestation_pb2.VerifierMessage:
    """One message: a Result, a Challenge, or both (the Result first for the agent)."""
    if result is None and challenge is None:
        raise ValueError("a VerifierMessage carries a Result, a Challenge or both")
    msg = attestation_pb2.VerifierMessage()
    if result is not None:
        msg.result.CopyFrom(result)
    if challenge is not None:
        msg.challenge.CopyFrom(challenge)
    return msg
