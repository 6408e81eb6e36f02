"""What the agent and the verifier say to each other, as values (STYLE 4).

The agent's logic (``attest``, ``enroll``) reads and makes these; ``devtrust.agent.wire`` alone
turns them into protobuf messages and back. The evidence body is not among them: it travels as
the serialized EvidenceBody the quote binds (why: ``devtrust.agent.wire``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509

from devtrust.agent.interfaces import Quote
from devtrust.core.ids import DeviceId, Nonce, Serial
from devtrust.core.tier import Tier

# --- the attestation stream ------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """Quote over ``selection`` for ``nonce``; ``event_log_from``: send the event log from
    this offset (0: the whole log), None: no log wanted."""

    nonce: Nonce
    selection: tuple[tuple[str, tuple[int, ...]], ...]
    event_log_from: int | None = None


@dataclass(frozen=True)
class LogChunk:
    """Part of the event log: ``data`` from ``offset`` of a log ``total_size`` bytes long."""

    offset: int
    data: bytes
    total_size: int

    @classmethod
    def since(cls, log: bytes, offset: int) -> LogChunk:
        """The log from ``offset``, or the whole log when ``offset`` is past its end: the
        host rebooted and this is a new log."""
        start = offset if offset <= len(log) else 0
        return cls(offset=start, data=log[start:], total_size=len(log))


@dataclass(frozen=True)
class Evidence:
    """The answer to a Challenge: a quote whose qualifying data binds the nonce and exactly
    ``body`` (``devtrust.core.binding.qualifying_data``)."""

    nonce: Nonce
    quote: Quote
    body: bytes
    event_log: LogChunk | None = None


@dataclass(frozen=True)
class TpmUnavailableNote:
    """The answer to a Challenge the TPM could not quote for: it does not answer (C5).
    ``detail`` says what failed, for the operator (bounded by ``wire``)."""

    nonce: Nonce
    detail: str


@dataclass(frozen=True)
class Claim:
    """One AR4SI trustworthiness claim: its name, numeric value and tier."""

    name: str
    value: int
    tier: Tier


@dataclass(frozen=True)
class Finding:
    """A reason the verifier gave, with its stable dotted id. ``severity`` is a word: info,
    warning, contraindicated (unspecified when the verifier sent none the agent knows)."""

    id: str
    severity: str
    claim: str
    message: str
    expected: str = ""
    found: str = ""
    subject: str = ""


@dataclass(frozen=True)
class Verdict:
    """What the verifier concluded of this device (its TrustResult, as far as the agent
    reads it)."""

    device_id: str
    tier: Tier
    score: int
    claims: tuple[Claim, ...] = ()
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate the verifier issued for the key the body asked it to certify:
    parsed where it arrived, ``der`` as sent (what is written to disk); ``trust_bundle``, the
    device issuing CAs that verify it (empty from a verifier that sends none)."""

    certificate: x509.Certificate
    der: bytes
    serial: Serial
    trust_bundle: tuple[x509.Certificate, ...] = ()


@dataclass(frozen=True)
class AttestationResult:
    """The verifier's answer to one Evidence: its verdict, the device certificate issued if
    one was, when the next challenge comes (zero: it travels with this result; None: the
    verifier did not say), and this device's revoked certificate serials."""

    trust: Verdict
    certificate: IssuedCertificate | None = None
    next_challenge_in: datetime.timedelta | None = None
    revoked_serials: tuple[Serial, ...] = ()


# --- enrollment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CredentialChallenge:
    """TPM2_MakeCredential's output for this host's EK and AK, under ``enrollment_id``."""

    enrollment_id: str
    credential_blob: bytes
    encrypted_secret: bytes


@dataclass(frozen=True)
class Activated:
    """The verifier's answer to a proven activation: the device id, whether an operator must
    approve first, and the channel certificate with its CA chain (DER)."""

    device_id: DeviceId
    pending_approval: bool
    channel_certificate: bytes
    ca_chain: tuple[bytes, ...] = ()
