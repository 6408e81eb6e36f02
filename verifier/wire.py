"""The gRPC edge (STYLE 4): protobuf messages are converted here, once, into validated domain
objects, and domain results back into messages. Nothing past the wire modules sees ``*_pb2``:
this one holds the Evidence and the types of common.proto (trust results, devices, tiers);
verifier/wire_body.py the evidence body; wire_attest.py, wire_enroll.py and wire_query.py
each service's own messages. Malformed input raises ``MalformedInput`` naming the field.
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.timestamp_pb2 import Timestamp

from devtrust.core.binding import PublicKey
from devtrust.core.ids import NONCE_SIZE, Nonce
from devtrust.core.tier import Tier
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier import wire_body
from devtrust.verifier.appraisal import EventLogPart, Evidence
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.records import DeviceRecord, DeviceState
from devtrust.verifier.tpm.constants import DIGEST_SIZES, hash_alg, hash_name
from devtrust.verifier.tpm.structures import PcrSelect
from devtrust.verifier.trust import Finding, Severity, SubResult, TrustResult, tier_of

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


def tier_to_wire(tier: Tier) -> common_pb2.Tier.ValueType:
    return _TIERS[tier]


def device_state_to_wire(state: DeviceState) -> common_pb2.DeviceState.ValueType:
    return _STATES[state]


def timestamp(value: datetime.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(datetime.UTC))
    return ts


def load_public_key(spki: bytes, *, field: str) -> PublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm) as exc:  # UnsupportedAlgorithm: an unknown curve
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


def posture_signals_from_wire(
    msg: attestation_pb2.PostureChanged, limits: LimitsConfig
) -> tuple[str, ...]:
    """The signals a PostureChanged names, bounded in number (names are only logged)."""
    wire_body.bounded(
        len(msg.signals),
        limits.max_posture_signals,
        "PostureChanged.signals",
        "max_posture_signals",
    )
    return tuple(msg.signals)


def evidence_from_wire(msg: attestation_pb2.Evidence, limits: LimitsConfig) -> Evidence:
    if len(msg.nonce) != NONCE_SIZE:
        raise MalformedInput(f"Evidence.nonce: expected {NONCE_SIZE} bytes, got {len(msg.nonce)}")
    if not msg.quote_attest or not msg.quote_signature:
        raise MalformedInput("Evidence: quote_attest and quote_signature are required")
    pcrs: dict[tuple[int, int], bytes] = {}
    banks: set[int] = set()
    for i, bank in enumerate(msg.pcrs):
        try:
            alg = hash_alg(bank.hash_alg)
        except ValueError as exc:
            raise MalformedInput(f"Evidence.pcrs[{i}]: {exc}") from exc
        if alg in banks:
            raise MalformedInput(f"Evidence.pcrs[{i}]: bank {bank.hash_alg} is reported twice")
        banks.add(alg)
        size = DIGEST_SIZES[alg]
        for index, value in bank.values.items():
            if index > MAX_PCR_INDEX or len(value) != size:
                raise MalformedInput(
                    f"Evidence.pcrs[{i}] {bank.hash_alg}:{index}: expected a PCR index 0..23 "
                    f"and {size} bytes, got {len(value)} bytes"
                )
            pcrs[(alg, index)] = value
    body = wire_body.body_from_wire(msg.body, limits)
    gpu_reports = wire_body.gpu_evidence(body)
    body.ClearField("gpu_reports")  # converted: policy never reads them (WireBody.plain)
    certify_key = (
        load_public_key(body.certify_key_spki, field="EvidenceBody.certify_key_spki")
        if body.certify_key_spki
        else None
    )
    event_log = None
    if msg.HasField("event_log"):
        event_log = EventLogPart(offset=msg.event_log.offset, data=msg.event_log.data)
    return Evidence(
        nonce=Nonce(msg.nonce),
        attest=msg.quote_attest,
        signature=msg.quote_signature,
        pcrs=pcrs,
        body=msg.body,
        body_doc=wire_body.WireBody(body, raw=msg.body),
        certify_key=certify_key,
        certify_key_proof=body.certify_key_proof,
        event_log=event_log,
        gpu_reports=gpu_reports,
    )


def result_to_wire(result: TrustResult) -> common_pb2.TrustResult:
    msg = common_pb2.TrustResult(
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
    )
    if result.submods:
        msg.MergeFromString(_submods_wire(result.submods))
    return msg


# The submods' encoding, by the identity of their tuple: a device's cached policy outcome
# hands every appraisal the same tuple (8 GPUs: most of a Result's conversion). Each entry
# holds its tuple, so no other tuple can take its id while it is cached; cleared when full.
_SUBMODS: dict[int, tuple[tuple[SubResult, ...], bytes]] = {}
_SUBMODS_MAX = 4096


def _submods_wire(submods: tuple[SubResult, ...]) -> bytes:
    """The TrustResult.submods field of ``submods``, encoded (merged into the message)."""
    cached = _SUBMODS.get(id(submods))
    if cached is not None and cached[0] is submods:
        return cached[1]
    data = common_pb2.TrustResult(
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
            for sub in submods
        ]
    ).SerializeToString()
    if len(_SUBMODS) >= _SUBMODS_MAX:
        _SUBMODS.clear()
    _SUBMODS[id(submods)] = (submods, data)
    return data


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
