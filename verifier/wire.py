"""The gRPC edge (STYLE 4): protobuf messages are converted here, once, into validated domain
objects, and domain results back into messages. Nothing past this module sees ``*_pb2``.
Malformed input raises ``MalformedInput`` naming the field.
"""

from __future__ import annotations

import datetime
import functools
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from protos.devtrust.v1 import attestation_pb2, common_pb2
from verifier import document
from verifier.appraisal import NONCE_SIZE, EventLogPart, Evidence
from verifier.ca import PublicKey
from verifier.errors import MalformedInput
from verifier.store import DeviceRecord, DeviceState
from verifier.tpm.constants import DIGEST_SIZES, hash_alg, hash_name
from verifier.tpm.structures import PcrSelect
from verifier.trust import Finding, Severity, Tier, TrustResult, tier_of

MAX_PCR_INDEX = 23
_TIERS = {
    Tier.NONE: common_pb2.TIER_NONE,
    Tier.AFFIRMING: common_pb2.TIER_AFFIRMING,
    Tier.WARNING: common_pb2.TIER_WARNING,
    Tier.CONTRAINDICATED: common_pb2.TIER_CONTRAINDICATED,
}
TIERS_FROM_WIRE = {v: k for k, v in _TIERS.items()}
_SEVERITIES = {
    Severity.INFO: common_pb2.SEVERITY_INFO,
    Severity.WARNING: common_pb2.SEVERITY_WARNING,
    Severity.CONTRAINDICATED: common_pb2.SEVERITY_CONTRAINDICATED,
}
_STATES = {
    DeviceState.PENDING_APPROVAL: common_pb2.DEVICE_STATE_PENDING_APPROVAL,
    DeviceState.ENROLLED: common_pb2.DEVICE_STATE_ENROLLED,
    DeviceState.REVOKED: common_pb2.DEVICE_STATE_REVOKED,
}


def timestamp(value: datetime.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(datetime.UTC))
    return ts


def load_public_key(spki: bytes, *, field: str) -> PublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except ValueError as exc:
        raise MalformedInput(f"{field}: not a DER SubjectPublicKeyInfo: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise MalformedInput(f"{field}: ECC key on {key.curve.name}; P-256 or P-384 only")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise MalformedInput(f"{field}: RSA key of {key.key_size} bits; 2048 at least")
        return key
    raise MalformedInput(f"{field}: {type(key).__name__} keys are not accepted")


def selection_to_wire(selection: tuple[PcrSelect, ...]) -> list[common_pb2.PcrSelection]:
    return [
        common_pb2.PcrSelection(hash_alg=hash_name(s.hash_alg), pcrs=list(s.pcrs))
        for s in selection
    ]


def evidence_from_wire(msg: attestation_pb2.Evidence) -> Evidence:
    if len(msg.nonce) != NONCE_SIZE:
        raise MalformedInput(f"Evidence.nonce: expected {NONCE_SIZE} bytes, got {len(msg.nonce)}")
    if not msg.quote_attest or not msg.quote_signature:
        raise MalformedInput("Evidence: quote_attest and quote_signature are required")
    pcrs: dict[tuple[int, int], bytes] = {}
    for i, bank in enumerate(msg.pcrs):
        try:
            alg = hash_alg(bank.hash_alg)
        except ValueError as exc:
            raise MalformedInput(f"Evidence.pcrs[{i}]: {exc}") from exc
        size = DIGEST_SIZES[alg]
        for index, value in bank.values.items():
            if index > MAX_PCR_INDEX or len(value) != size:
                raise MalformedInput(
                    f"Evidence.pcrs[{i}] {bank.hash_alg}:{index}: expected a PCR index 0..23 "
                    f"and {size} bytes, got {len(value)} bytes"
                )
            pcrs[(alg, index)] = value
    body = attestation_pb2.EvidenceBody()
    try:
        body.ParseFromString(msg.body)
    except DecodeError as exc:
        raise MalformedInput(f"Evidence.body: not an EvidenceBody: {exc}") from exc
    certify_key = (
        load_public_key(body.certify_key_spki, field="EvidenceBody.certify_key_spki")
        if body.certify_key_spki
        else None
    )
    event_log = None
    if msg.HasField("event_log"):
        event_log = EventLogPart(offset=msg.event_log.offset, data=msg.event_log.data)
    posture = hashlib.sha256(
        b"".join(
            part.SerializeToString(deterministic=True) for part in (body.host, body.os, body.gpu)
        )
    ).hexdigest()
    return Evidence(
        body_doc=functools.partial(document.plain, body),
        posture_digest=posture,
        event_log=event_log,
        nonce=msg.nonce,
        attest=msg.quote_attest,
        signature=msg.quote_signature,
        pcrs=pcrs,
        body=msg.body,
        certify_key=certify_key,
    )


def result_to_wire(result: TrustResult) -> common_pb2.TrustResult:
    return common_pb2.TrustResult(
        device_id=result.device_id,
        tier=_TIERS[result.tier],
        score=result.score,
        claims=[
            common_pb2.TrustClaim(name=c.value, value=v, tier=_TIERS[tier_of(v)])
            for c, v in result.claims.items()
        ],
        findings=[_finding(f) for f in result.findings],
        appraised_at=timestamp(result.appraised_at),
        expires_at=timestamp(result.expires_at),
        evidence_digest=result.evidence_digest,
        policy_id=result.policy_id,
        submods=[
            common_pb2.SubResult(
                name=sub.name,
                tier=_TIERS[sub.tier],
                claims=[
                    common_pb2.TrustClaim(name=c.value, value=v, tier=_TIERS[tier_of(v)])
                    for c, v in sub.claims.items()
                ],
                findings=[_finding(f) for f in sub.findings],
            )
            for sub in result.submods
        ],
    )


def _finding(f: Finding) -> common_pb2.Finding:
    return common_pb2.Finding(
        id=f.id,
        severity=_SEVERITIES[f.severity],
        claim=f.claim.value,
        message=f.message,
        expected=f.expected,
        found=f.found,
        subject=f.subject,
    )


def device_to_wire(rec: DeviceRecord, result: TrustResult | None) -> common_pb2.Device:
    host = rec.host
    msg = common_pb2.Device(
        device_id=rec.device_id,
        state=_STATES[rec.state],
        host=common_pb2.HostFacts(
            hostname=str(host.get("hostname", "")),
            os_release=str(host.get("os_release", "")),
            kernel=str(host.get("kernel", "")),
            machine_id=str(host.get("machine_id", "")),
            agent_version=str(host.get("agent_version", "")),
            labels=rec.labels,
            zone=rec.zone,
        ),
        enrolled_at=timestamp(rec.enrolled_at),
        ek_certificate_sha256=hashlib.sha256(rec.ek_certificate).hexdigest(),
        ak_name=rec.ak_name,
    )
    if rec.last_seen:
        msg.last_seen.CopyFrom(timestamp(rec.last_seen))
    if result is not None:
        msg.last_result.CopyFrom(result_to_wire(result))
    return msg
