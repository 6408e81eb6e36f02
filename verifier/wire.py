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

from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier import document
from devtrust.verifier.appraisal import NONCE_SIZE, EventLogPart, Evidence
from devtrust.verifier.ca import PublicKey
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.records import DeviceRecord, DeviceState
from devtrust.verifier.tpm.constants import DIGEST_SIZES, hash_alg, hash_name
from devtrust.verifier.tpm.structures import PcrSelect
from devtrust.verifier.trust import Finding, Severity, Tier, TrustResult, tier_of

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


def _bounded(count: int, limit: int, what: str, key: str) -> None:
    if count > limit:
        raise LimitExceeded(
            f"{what}: {count} entries, more than the limit of {limit} (limits.{key})"
        )


# What a host says of itself is stored with its device and shown to operators in every
# Device message: bounded, so that one host cannot make a ListDevices page too large to send.
MAX_HOSTNAME = 253  # a DNS name
MAX_HOST_TEXT = 1024
MAX_LABEL_TEXT = 256


def check_host_facts(host: common_pb2.HostFacts, limits: LimitsConfig, *, where: str) -> None:
    """HostFacts strings and labels within their limits; raises ``LimitExceeded``."""
    texts = {
        "hostname": (host.hostname, MAX_HOSTNAME),
        "os_release": (host.os_release, MAX_HOST_TEXT),
        "kernel": (host.kernel, MAX_HOST_TEXT),
        "machine_id": (host.machine_id, MAX_HOST_TEXT),
        "agent_version": (host.agent_version, MAX_HOST_TEXT),
        "zone": (host.zone, MAX_LABEL_TEXT),
    }
    for name, (text, limit) in texts.items():
        if len(text) > limit:
            raise LimitExceeded(f"{where}.{name}: {len(text)} characters, more than {limit}")
    _bounded(len(host.labels), limits.max_map_entries, f"{where}.labels", "max_map_entries")
    for key, value in host.labels.items():
        if len(key) > MAX_LABEL_TEXT or len(value) > MAX_LABEL_TEXT:
            raise LimitExceeded(
                f"{where}.labels: a key or value of more than {MAX_LABEL_TEXT} characters"
            )


def check_body_limits(body: attestation_pb2.EvidenceBody, limits: LimitsConfig) -> None:
    """Every repeated field of an evidence body within its limit (issue 7, item 7): work per
    evidence stays bounded whatever a device sends. Raises ``LimitExceeded``."""
    maps = limits.max_map_entries
    check_host_facts(body.host, limits, where="EvidenceBody.host")
    os = body.os
    _bounded(len(os.modules), limits.max_modules, "EvidenceBody.os.modules", "max_modules")
    _bounded(
        len(os.listening),
        limits.max_listening_sockets,
        "EvidenceBody.os.listening",
        "max_listening_sockets",
    )
    _bounded(len(os.mounts), limits.max_mounts, "EvidenceBody.os.mounts", "max_mounts")
    _bounded(
        len(os.unavailable),
        limits.max_unavailable,
        "EvidenceBody.os.unavailable",
        "max_unavailable",
    )
    gpu = body.gpu
    _bounded(len(gpu.gpus), limits.max_gpus, "EvidenceBody.gpu.gpus", "max_gpus")
    _bounded(
        len(gpu.unavailable),
        limits.max_unavailable,
        "EvidenceBody.gpu.unavailable",
        "max_unavailable",
    )
    seen: set[int] = set()
    for i, g in enumerate(gpu.gpus):
        where = f"EvidenceBody.gpu.gpus[{i}]"
        if g.index in seen:  # GPU results (submods) are keyed by index
            raise MalformedInput(f"{where}: GPU index {g.index} is reported twice")
        seen.add(g.index)
        _bounded(
            len(g.nvlinks), limits.max_nvlinks_per_gpu, f"{where}.nvlinks", "max_nvlinks_per_gpu"
        )
        _bounded(
            len(g.mig_devices),
            limits.max_mig_devices_per_gpu,
            f"{where}.mig_devices",
            "max_mig_devices_per_gpu",
        )
        _bounded(
            len(g.recent_xids), limits.max_xids_per_gpu, f"{where}.recent_xids", "max_xids_per_gpu"
        )
        _bounded(
            len(g.unavailable), limits.max_unavailable, f"{where}.unavailable", "max_unavailable"
        )
        _bounded(len(g.cc_settings), maps, f"{where}.cc_settings", "max_map_entries")
        _bounded(len(g.fabric_health), maps, f"{where}.fabric_health", "max_map_entries")


def posture_signals_from_wire(
    msg: attestation_pb2.PostureChanged, limits: LimitsConfig
) -> tuple[str, ...]:
    """The signals a PostureChanged names, bounded in number (names are only logged)."""
    _bounded(
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
    body = attestation_pb2.EvidenceBody()
    try:
        body.ParseFromString(msg.body)
    except DecodeError as exc:
        raise MalformedInput(f"Evidence.body: not an EvidenceBody: {exc}") from exc
    check_body_limits(body, limits)
    certify_key = (
        load_public_key(body.certify_key_spki, field="EvidenceBody.certify_key_spki")
        if body.certify_key_spki
        else None
    )
    event_log = None
    if msg.HasField("event_log"):
        event_log = EventLogPart(offset=msg.event_log.offset, data=msg.event_log.data)
    # The policy's cache key: which parts were sent (an absent part and an empty one differ
    # to required_evidence) and their bytes, each length-prefixed.
    digest = hashlib.sha256()
    for name in ("host", "os", "gpu"):
        data = getattr(body, name).SerializeToString(deterministic=True)
        digest.update(b"\x01" if body.HasField(name) else b"\x00")
        digest.update(len(data).to_bytes(8, "big") + data)
    posture = digest.hexdigest()
    return Evidence(
        certify_key_proof=body.certify_key_proof,
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
