"""The Enrollment service's messages at the gRPC edge (STYLE 4), in both directions.

In: EnrollRequest and ActivateRequest become the frozen values of verifier/enrollment.py,
with the checks that need only the message itself (an EK public area is present, the host's
own facts are within their limits); what needs keys, certificates or the store is checked by
the service, in the order of DESIGN.md flow 1. Out: an issued challenge and an activation
become EnrollChallenge and ActivateResponse. The servicer builds no message itself.
"""

from __future__ import annotations

from devtrust.v1 import common_pb2, enrollment_pb2
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.enrollment import (
    Activated,
    ActivateRequest,
    EnrollRequest,
    HostClaims,
    IssuedChallenge,
)
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.wire import device_state_to_wire
from devtrust.verifier.wire_body import check_host_facts


def host_claims_from_wire(host: common_pb2.HostFacts) -> HostClaims:
    """A host's facts as it states them; the caller has checked their limits."""
    return HostClaims(
        hostname=host.hostname,
        os_release=host.os_release,
        kernel=host.kernel,
        machine_id=host.machine_id,
        agent_version=host.agent_version,
        zone=host.zone,
        labels=dict(host.labels),
    )


def enroll_request_from_wire(
    msg: enrollment_pb2.EnrollRequest, limits: LimitsConfig
) -> EnrollRequest:
    """Raises ``MalformedInput`` (no EK public area) or ``LimitExceeded`` (host facts)."""
    if not msg.ek_public:
        raise MalformedInput("EnrollRequest.ek_public is empty")
    check_host_facts(msg.host, limits, where="EnrollRequest.host")
    return EnrollRequest(
        ek_public=msg.ek_public,
        ak_public=msg.ak_public,
        channel_key_spki=msg.channel_key_spki,
        host=host_claims_from_wire(msg.host),
        ek_certificate=msg.ek_certificate,
        ek_intermediates=tuple(msg.ek_intermediates),
        bootstrap_token=msg.bootstrap_token,
    )


def activate_request_from_wire(msg: enrollment_pb2.ActivateRequest) -> ActivateRequest:
    """Not checked here: an unknown enrollment id and a wrong proof are the service's
    answers (NOT_FOUND, PERMISSION_DENIED), not malformed input."""
    return ActivateRequest(enrollment_id=msg.enrollment_id, proof=msg.proof)


def challenge_to_wire(issued: IssuedChallenge) -> enrollment_pb2.EnrollChallenge:
    return enrollment_pb2.EnrollChallenge(
        enrollment_id=issued.enrollment_id,
        credential_blob=issued.credential_blob,
        encrypted_secret=issued.encrypted_secret,
        device_id=issued.device_id,
    )


def activated_to_wire(activated: Activated) -> enrollment_pb2.ActivateResponse:
    return enrollment_pb2.ActivateResponse(
        device_id=activated.device_id,
        state=device_state_to_wire(activated.state),
        channel_certificate=activated.channel_certificate,
        ca_chain=list(activated.ca_chain),
    )
