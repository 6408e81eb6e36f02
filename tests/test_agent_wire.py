"""The agent's wire conversions (issue 9, item 4): every message the agent sends or receives is
built or read in ``devtrust.agent.wire``, into the values of ``devtrust.agent.messages``; what
does not parse is refused there, and the client and enrollment import no protobuf message."""

from __future__ import annotations

import ast
import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from devtrust.agent import wire
from devtrust.agent.errors import MalformedMessage
from devtrust.agent.interfaces import Quote
from devtrust.agent.messages import Challenge, Claim, Evidence, Finding, LogChunk
from devtrust.agent.state import new_key
from devtrust.core.claims import DeviceClaims
from devtrust.core.ids import DeviceId, Nonce
from devtrust.core.tier import Tier
from devtrust.v1 import attestation_pb2, common_pb2, enrollment_pb2
from devtrust.verifier.ca import CertificateAuthority
from devtrust.verifier.pki import PkiFiles

AGENT = Path(__file__).resolve().parent.parent / "agent"
DEVICE = DeviceId("5e" * 32)
NONCE = Nonce(bytes(range(32)))


def _certificate_der(pki: PkiFiles) -> bytes:
    cert = CertificateAuthority.load(pki.ca_cert, pki.ca_key).issue_device(
        trust_domain="devtrust.local",
        device_id=DEVICE,
        public_key=new_key().public_key(),
        claims=DeviceClaims(tier=Tier.AFFIRMING, zone=""),
        now=datetime.datetime.now(datetime.UTC),
        lifetime=datetime.timedelta(hours=1),
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_tiers_from_the_wire_unknown_and_unspecified_claim_nothing() -> None:
    values = [0, 1, 2, 3, 4, 99]
    assert [wire.tier_from_wire(v) for v in values] == [
        Tier.NONE,
        Tier.NONE,
        Tier.AFFIRMING,
        Tier.WARNING,
        Tier.CONTRAINDICATED,
        Tier.NONE,
    ]


def test_a_result_becomes_a_value(pki: PkiFiles) -> None:
    der = _certificate_der(pki)
    msg = attestation_pb2.Result(
        trust=common_pb2.TrustResult(
            device_id=DEVICE,
            tier=common_pb2.TIER_WARNING,
            score=70,
            claims=[
                common_pb2.TrustClaim(name="hardware", value=2, tier=common_pb2.TIER_AFFIRMING)
            ],
            findings=[
                common_pb2.Finding(
                    id="ssh.root_login",
                    severity=common_pb2.SEVERITY_WARNING,
                    claim="configuration",
                    message="root may log in",
                    expected="no",
                    found="yes",
                    subject="sshd",
                )
            ],
        ),
        certificate=common_pb2.DeviceCertificate(certificate_der=der, serial_hex="1f"),
    )
    msg.next_challenge_in.FromTimedelta(datetime.timedelta(seconds=0))
    result = wire.result_from_wire(msg)
    assert result.trust.device_id == DEVICE
    assert result.trust.tier is Tier.WARNING
    assert result.trust.score == 70
    assert result.trust.claims == (Claim("hardware", 2, Tier.AFFIRMING),)
    assert result.trust.findings == (
        Finding(
            "ssh.root_login", "warning", "configuration", "root may log in", "no", "yes", "sshd"
        ),
    )
    assert result.certificate is not None
    assert result.certificate.der == der
    assert result.certificate.serial == "1f"
    assert result.certificate.certificate.public_bytes(serialization.Encoding.DER) == der
    assert result.next_challenge_in == datetime.timedelta(0)
    # Without certificate or schedule: None, not an empty certificate or a zero delay.
    bare = wire.result_from_wire(attestation_pb2.Result(trust=msg.trust))
    assert bare.certificate is None
    assert bare.next_challenge_in is None


def test_a_message_that_does_not_parse_is_refused_at_the_edge() -> None:
    junk = common_pb2.DeviceCertificate(certificate_der=b"not DER", serial_hex="1")
    with pytest.raises(MalformedMessage, match="device certificate that does not parse"):
        wire.result_from_wire(attestation_pb2.Result(certificate=junk))
    with pytest.raises(MalformedMessage, match="expected a VerifierMessage, got AgentMessage"):
        wire.verifier_message_from_wire(attestation_pb2.AgentMessage())
    # The device id names the agent's files and is signed into every proof of possession.
    for bad in ("", "../../etc/passwd", "5E" * 32):
        with pytest.raises(MalformedMessage, match="is not 64 lowercase hex digits"):
            wire.activated_from_wire(enrollment_pb2.ActivateResponse(device_id=bad))


def test_a_verifier_message_carries_a_result_a_challenge_or_both() -> None:
    challenge = attestation_pb2.Challenge(
        nonce=NONCE,
        pcr_selection=[common_pb2.PcrSelection(hash_alg="sha256", pcrs=[0, 7])],
        event_log=attestation_pb2.EventLogRequest(wanted=True, from_offset=4),
    )
    both = attestation_pb2.VerifierMessage(result=attestation_pb2.Result(), challenge=challenge)
    result, asked = wire.verifier_message_from_wire(both)
    assert result is not None
    assert result.trust.tier is Tier.NONE
    assert asked == Challenge(NONCE, (("sha256", (0, 7)),), event_log_from=4)
    only = attestation_pb2.VerifierMessage(challenge=attestation_pb2.Challenge(nonce=NONCE))
    assert wire.verifier_message_from_wire(only) == (None, Challenge(NONCE, (), None))


def test_evidence_to_the_wire() -> None:
    quote = Quote(b"attest", b"signature", {("sha256", 0): b"a" * 32, ("sha1", 7): b"b" * 20})
    msg = wire.evidence_to_wire(
        Evidence(NONCE, quote, b"body bytes", LogChunk.since(b"0123456789", 4))
    ).evidence
    assert (msg.nonce, msg.quote_attest, msg.quote_signature, msg.body) == (
        NONCE,
        b"attest",
        b"signature",
        b"body bytes",
    )
    assert {b.hash_alg: dict(b.values) for b in msg.pcrs} == {
        "sha256": {0: b"a" * 32},
        "sha1": {7: b"b" * 20},
    }
    assert (msg.event_log.offset, msg.event_log.data, msg.event_log.total_size) == (
        4,
        b"456789",
        10,
    )
    no_log = wire.evidence_to_wire(Evidence(NONCE, quote, b"body")).evidence
    assert not no_log.HasField("event_log")


def test_enrollment_messages() -> None:
    request = wire.enroll_request_to_wire(
        ek_certificate=None,
        ek_public=b"ek",
        ak_public=b"ak",
        host=common_pb2.HostFacts(hostname="h"),
        bootstrap_token="t",
        channel_key_spki=b"spki",
    )
    assert request == enrollment_pb2.EnrollRequest(
        ek_public=b"ek",
        ak_public=b"ak",
        host=common_pb2.HostFacts(hostname="h"),
        bootstrap_token="t",
        channel_key_spki=b"spki",
    )
    challenge = wire.credential_challenge_from_wire(
        enrollment_pb2.EnrollChallenge(
            enrollment_id="e1", credential_blob=b"blob", encrypted_secret=b"secret"
        )
    )
    assert (challenge.enrollment_id, challenge.credential_blob, challenge.encrypted_secret) == (
        "e1",
        b"blob",
        b"secret",
    )
    assert wire.activate_request_to_wire(enrollment_id="e1", proof=b"p") == (
        enrollment_pb2.ActivateRequest(enrollment_id="e1", proof=b"p")
    )
    pending = wire.activated_from_wire(
        enrollment_pb2.ActivateResponse(
            device_id=DEVICE, state=common_pb2.DEVICE_STATE_PENDING_APPROVAL
        )
    )
    assert pending.pending_approval
    enrolled = wire.activated_from_wire(
        enrollment_pb2.ActivateResponse(
            device_id=DEVICE,
            state=common_pb2.DEVICE_STATE_ENROLLED,
            channel_certificate=b"cert",
            ca_chain=[b"ca1", b"ca2"],
        )
    )
    assert not enrolled.pending_approval
    assert (enrolled.device_id, enrolled.channel_certificate, enrolled.ca_chain) == (
        DEVICE,
        b"cert",
        (b"ca1", b"ca2"),
    )


def test_the_log_from_an_offset_or_whole_after_a_reboot() -> None:
    assert LogChunk.since(b"0123456789", 10) == LogChunk(10, b"", 10)
    assert LogChunk.since(b"0123456789", 11) == LogChunk(0, b"0123456789", 10)


@pytest.mark.parametrize("module", ["attest.py", "enroll.py"])
def test_the_client_and_enrollment_build_no_message(module: str) -> None:
    """They may name the generated stubs (the transport), never the messages."""
    tree = ast.parse((AGENT / module).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "devtrust.v1"
        for alias in node.names
    }
    assert imported <= {"attestation_pb2_grpc", "enrollment_pb2_grpc"}, imported
