"""Appraisal of one piece of attestation evidence (DESIGN.md flow 2). Pure (STYLE 1-2):
parsed evidence, what this stream expects, and ``now`` in; a ``TrustResult`` out. No gRPC,
database or TPM here. Hard failures end the appraisal at once (STYLE 8).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NewType

from agent.evidence import qualifying_data
from verifier.ca import PublicKey
from verifier.tpm.quote import AkKey, QuoteRejected, check_quote
from verifier.tpm.structures import Attest, PcrSelect
from verifier.trust import (
    CRYPTO_VALIDATION_FAILED,
    HARDWARE_GENUINE,
    IDENTITY_RECOGNIZED,
    Claim,
    Finding,
    Severity,
    TrustResult,
)

Nonce = NewType("Nonce", bytes)
NONCE_SIZE = 32


@dataclass(frozen=True)
class Evidence:
    """Validated evidence from one agent message (converted at the gRPC edge)."""

    nonce: bytes
    attest: bytes
    signature: bytes
    pcrs: Mapping[tuple[int, int], bytes]
    body: bytes
    certify_key: PublicKey | None

    @property
    def body_digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(frozen=True)
class Expectation:
    """What the verifier knows before looking at the evidence."""

    device_id: str
    nonce: Nonce
    selection: tuple[PcrSelect, ...]
    ak_key: AkKey
    staleness: datetime.timedelta


@dataclass(frozen=True)
class Appraisal:
    result: TrustResult
    attest: Attest | None

    @property
    def passed(self) -> bool:
        return self.attest is not None


def appraise(evidence: Evidence, expect: Expectation, *, now: datetime.datetime) -> Appraisal:
    def result(claims: dict[Claim, int], findings: tuple[Finding, ...]) -> TrustResult:
        return TrustResult(
            device_id=expect.device_id,
            claims=claims,
            findings=findings,
            appraised_at=now,
            expires_at=now + expect.staleness,
            evidence_digest=evidence.body_digest,
        )

    def hard_failure(finding_id: str, message: str, expected: str, found: str) -> Appraisal:
        finding = Finding(
            id=finding_id,
            severity=Severity.CONTRAINDICATED,
            claim=Claim.INSTANCE_IDENTITY,
            message=f"device {expect.device_id}: {message}",
            expected=expected,
            found=found,
        )
        return Appraisal(
            result({Claim.INSTANCE_IDENTITY: CRYPTO_VALIDATION_FAILED}, (finding,)), None
        )

    # 1. The nonce is the one this stream sent and has not been used (the caller pops it).
    if not hmac.compare_digest(evidence.nonce, expect.nonce):
        return hard_failure(
            "tpm.challenge.nonce_mismatch",
            "evidence answers a nonce this stream did not send",
            expect.nonce.hex(),
            evidence.nonce.hex(),
        )
    # 2-7. Quote: AK signature, magic, type, qualifying data, selection, PCR digest.
    try:
        attest = check_quote(
            attest_bytes=evidence.attest,
            signature_bytes=evidence.signature,
            ak_key=expect.ak_key,
            expected_qualifying_data=qualifying_data(expect.nonce, evidence.body),
            requested=expect.selection,
            pcr_values=evidence.pcrs,
        )
    except QuoteRejected as rej:
        return hard_failure(rej.finding_id, rej.message, rej.expected, rej.found)
    # The AK is the one enrolled through credential activation against a verified EK
    # certificate: the instance is recognized and its hardware is a genuine TPM.
    claims = {Claim.INSTANCE_IDENTITY: IDENTITY_RECOGNIZED, Claim.HARDWARE: HARDWARE_GENUINE}
    return Appraisal(result(claims, ()), attest)
