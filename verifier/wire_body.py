"""The evidence body at the gRPC edge (STYLE 4): the received ``EvidenceBody`` checked against
its limits, and turned into what policy reads, plain values (verifier/document.py builds the
policy document from them). Nothing past this module sees the message.

The conversion is lazy: ``WireBody`` holds the parsed message and converts it at the first
``plain()`` call, once. An appraisal whose cached policy outcome still holds (the posture, the
policy and the device's zone and labels unchanged) never converts it: ~0.3 ms saved per
8-GPU appraisal (DESIGN.md "Costs").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.errors import LimitExceeded, MalformedInput
from devtrust.verifier.gpu.types import REPORT, STATUSES, GpuEvidence

_INT64_MAX = 2**63 - 1
_UNSIGNED_64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)


def _int64(value: int) -> int:
    return min(value, _INT64_MAX)


# How each field of a message type converts, worked out once per type from its descriptor
# (reading descriptor options on every field of every message was most of the cost).
_MAP, _REPEATED_MESSAGE, _REPEATED_U64, _REPEATED, _MESSAGE, _BYTES, _U64, _SCALAR = range(8)
_PLANS: dict[Any, tuple[tuple[str, int, bool], ...]] = {}


def _plan(descriptor: Any) -> tuple[tuple[str, int, bool], ...]:
    """Per field: its name, how it converts, and whether it has presence (unset: None)."""
    plan = _PLANS.get(descriptor)
    if plan is not None:
        return plan
    fields = []
    for field in descriptor.fields:
        message = field.message_type is not None
        u64 = field.type in _UNSIGNED_64
        if message and field.message_type.GetOptions().map_entry:
            kind = _MAP
        elif field.is_repeated:
            kind = _REPEATED_MESSAGE if message else _REPEATED_U64 if u64 else _REPEATED
        elif message:
            kind = _MESSAGE
        elif field.type == FieldDescriptor.TYPE_BYTES:
            kind = _BYTES
        else:
            kind = _U64 if u64 else _SCALAR
        presence = kind not in (_MAP, _REPEATED_MESSAGE, _REPEATED_U64, _REPEATED)
        fields.append((field.name, kind, presence and field.has_presence))
    plan = _PLANS[descriptor] = tuple(fields)
    return plan


def plain(msg: Message) -> dict[str, Any]:
    """A message as dicts: every field present; unset optional fields and unset sub-messages
    are None (a value the host could not read is null, never false); bytes are hex; uint64
    values above int64 are saturated (a CEL int, like every other integer: the CEL runtime
    would make them a ``uint``, and int and uint do not mix in arithmetic)."""
    out: dict[str, Any] = {}
    for name, kind, presence in _plan(msg.DESCRIPTOR):
        if presence and not msg.HasField(name):
            out[name] = None
            continue
        value = getattr(msg, name)
        if kind == _SCALAR:
            out[name] = value
        elif kind == _MESSAGE:
            out[name] = plain(value)
        elif kind == _REPEATED_MESSAGE:
            out[name] = [plain(v) for v in value]
        elif kind == _REPEATED:
            out[name] = list(value)
        elif kind == _MAP:
            out[name] = dict(value)
        elif kind == _BYTES:
            out[name] = value.hex()
        elif kind == _U64:
            out[name] = _int64(value)
        else:  # _REPEATED_U64
            out[name] = [_int64(v) for v in value]
    return out


class WireBody:
    """The verifier.appraisal ``BodyDocument`` of a received evidence body: its policy values
    converted at the first ``plain()`` call and kept, and its posture digest.

    It owns the message it is given (``body_from_wire`` makes one for it): nothing else holds
    a reference that could change the message under the cached values."""

    __slots__ = ("_digest", "_msg", "_plain", "_raw")

    def __init__(self, msg: attestation_pb2.EvidenceBody, raw: bytes | None = None) -> None:
        """``raw``: the bytes ``msg`` was parsed from, when the caller has them (the
        posture digest is then taken from them, without serializing the parts again)."""
        self._msg = msg
        self._raw = raw
        self._plain: dict[str, Any] | None = None
        self._digest = ""

    @property
    def posture_digest(self) -> str:
        """The policy's cache key: exactly what the document is built from, host, os and
        gpu, and which of them were sent (an absent part and an empty one differ to
        required_evidence); collected_at and the certify key, which change at every
        evidence, are left out. From the received bytes (``raw_parts``: each occurrence of
        the three fields, with its field number and length), else from the parts serialized
        again. Equal digests mean equal parts; equal parts sent in other bytes merely get
        another digest (the policy runs again)."""
        if not self._digest:
            parts = raw_parts(self._raw) if self._raw is not None else None
            if parts is None:
                parts = self._serialized_parts()
            self._digest = hashlib.sha256(parts).hexdigest()
        return self._digest

    def _serialized_parts(self) -> bytes:
        """The parts sent, serialized again, in the form ``raw_parts`` gives (for bytes
        serialized deterministically, as the agent does, the same)."""
        msg = self._msg
        out = [b"parts\0"]
        for name in ("host", "os", "gpu"):
            if msg.HasField(name):
                data = getattr(msg, name).SerializeToString(deterministic=True)
                number = _FIELD_NUMBERS[name]
                out.append(bytes([number]) + len(data).to_bytes(8, "big") + data)
        return b"".join(out)

    def plain(self) -> Mapping[str, Any]:
        """host, os and gpu (and the rest of the body but gpu_reports) as plain values; a
        part the body did not carry is None. Read-only: every appraisal of this evidence
        shares them. The GPU reports are left out: policy reads what their verification
        found (verifier/gpu/appraise.py), never the unverified reports, whose nonce changes
        at every challenge (``gpu_evidence`` converts them; ``evidence_from_wire`` then
        drops them from the message, so that they cost nothing here)."""
        if self._plain is None:
            values = plain(self._msg)
            for name in _NOT_PLAIN:
                values.pop(name, None)
            self._plain = values
        return self._plain


# EvidenceBody's fields that WireBody.plain() leaves out.
_NOT_PLAIN = frozenset({"gpu_reports"})
# EvidenceBody's fields policy reads (protos/devtrust/v1/attestation.proto): host, os, gpu.
_FIELD_NUMBERS = {
    name: attestation_pb2.EvidenceBody.DESCRIPTOR.fields_by_name[name].number
    for name in ("host", "os", "gpu")
}
_POSTURE_FIELDS = frozenset(_FIELD_NUMBERS.values())
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def raw_parts(data: bytes) -> bytes | None:
    """Of a serialized EvidenceBody, every length-delimited occurrence of host, os and gpu
    (protobuf merges repeated occurrences: all count), each as its field number, length
    and bytes, in order: what the parser builds those parts from, nothing else. None when
    the bytes hold what this scan does not follow (a group): the caller serializes the
    parsed parts instead."""
    out = [b"parts\0"]
    at, end = 0, len(data)
    try:
        while at < end:
            key, at = _varint(data, at)
            number, kind = key >> 3, key & 7
            if kind == _LEN:
                size, at = _varint(data, at)
                if at + size > end:
                    return None
                if number in _POSTURE_FIELDS:
                    out.append(bytes([number]) + size.to_bytes(8, "big") + data[at : at + size])
                at += size
            elif kind == _VARINT:
                _, at = _varint(data, at)
            elif kind == _I64:
                at += 8
            elif kind == _I32:
                at += 4
            else:
                return None
    except ValueError:
        return None
    return b"".join(out) if at == end else None


def body_from_wire(data: bytes, limits: LimitsConfig) -> attestation_pb2.EvidenceBody:
    """The serialized ``Evidence.body`` parsed and within its limits: raises
    ``MalformedInput`` or ``LimitExceeded``."""
    body = attestation_pb2.EvidenceBody()
    try:
        body.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedInput(f"Evidence.body: not an EvidenceBody: {exc}") from exc
    check_body_limits(body, limits)
    return body


def body_from_json(data: bytes) -> WireBody:
    """An evidence body in protobuf's JSON form, as ``devtrust-agent collect --json`` prints
    it (an operator's dry run of a policy, verifier/tools.py): raises ``MalformedInput``.
    No limits: the operator's own file, not a device's message."""
    try:
        body = json_format.Parse(data.decode(), attestation_pb2.EvidenceBody())
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise MalformedInput(f"not an EvidenceBody in JSON: {exc}") from exc
    return WireBody(body)


def bounded(count: int, limit: int, what: str, key: str) -> None:
    """Raises ``LimitExceeded`` naming the field and the limit's configuration key."""
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
    bounded(len(host.labels), limits.max_map_entries, f"{where}.labels", "max_map_entries")
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
    bounded(len(os.modules), limits.max_modules, "EvidenceBody.os.modules", "max_modules")
    bounded(
        len(os.listening),
        limits.max_listening_sockets,
        "EvidenceBody.os.listening",
        "max_listening_sockets",
    )
    bounded(len(os.mounts), limits.max_mounts, "EvidenceBody.os.mounts", "max_mounts")
    bounded(
        len(os.unavailable),
        limits.max_unavailable,
        "EvidenceBody.os.unavailable",
        "max_unavailable",
    )
    gpu = body.gpu
    bounded(len(gpu.gpus), limits.max_gpus, "EvidenceBody.gpu.gpus", "max_gpus")
    bounded(
        len(gpu.unavailable),
        limits.max_unavailable,
        "EvidenceBody.gpu.unavailable",
        "max_unavailable",
    )
    seen: set[int] = set()
    per_gpu = (
        ("nvlinks", limits.max_nvlinks_per_gpu, "max_nvlinks_per_gpu"),
        ("mig_devices", limits.max_mig_devices_per_gpu, "max_mig_devices_per_gpu"),
        ("recent_xids", limits.max_xids_per_gpu, "max_xids_per_gpu"),
        ("unavailable", limits.max_unavailable, "max_unavailable"),
        ("cc_settings", maps, "max_map_entries"),
        ("fabric_health", maps, "max_map_entries"),
    )
    for i, g in enumerate(gpu.gpus):
        if g.index in seen:  # GPU results (submods) are keyed by index
            raise MalformedInput(
                f"EvidenceBody.gpu.gpus[{i}]: GPU index {g.index} is reported twice"
            )
        seen.add(g.index)
        for name, limit, key in per_gpu:
            count = len(getattr(g, name))
            if count > limit:  # the field's name is made only for the error
                bounded(count, limit, f"EvidenceBody.gpu.gpus[{i}].{name}", key)
        for name in _GPU_TEXTS:
            if len(getattr(g, name)) > MAX_GPU_TEXT:
                raise LimitExceeded(
                    f"EvidenceBody.gpu.gpus[{i}].{name}: {len(getattr(g, name))} characters, "
                    f"more than {MAX_GPU_TEXT}"
                )
    for name in _STATE_TEXTS:
        if len(getattr(gpu, name)) > MAX_GPU_TEXT:
            raise LimitExceeded(
                f"EvidenceBody.gpu.{name}: {len(getattr(gpu, name))} characters, "
                f"more than {MAX_GPU_TEXT}"
            )
    check_gpu_reports(body.gpu_reports, seen, limits)


# A GPU's identity and version strings name it in every finding, result and log line about
# it (policy submods, GPU attestation): bounded, so that no GPU can make them large.
MAX_GPU_TEXT = 256
_GPU_TEXTS = tuple(
    f.name
    for f in attestation_pb2.Gpu.DESCRIPTOR.fields
    if f.type == f.TYPE_STRING and not f.is_repeated
)
_STATE_TEXTS = tuple(
    f.name
    for f in attestation_pb2.GpuState.DESCRIPTOR.fields
    if f.type == f.TYPE_STRING and not f.is_repeated
)


# What one GpuReport may hold (agent/gpu/attest.py keeps its reports within the same).
MAX_GPU_DETAIL = 1024  # characters
MAX_GPU_REPORT = 64 * 1024  # bytes: NVML's buffer is 8 KiB
MAX_GPU_CERTIFICATES = 8  # NVIDIA's device chains hold 5
MAX_GPU_CERTIFICATE = 16 * 1024  # bytes, DER


def check_gpu_reports(
    reports: Sequence[attestation_pb2.GpuReport], gpus: set[int], limits: LimitsConfig
) -> None:
    """EvidenceBody.gpu_reports within their limits: at most limits.max_gpus, each for a
    GPU index of gpu.gpus (``gpus``) and at most once, a known status, a bounded detail,
    report and chain; a "report" has both, the others neither. Raises ``LimitExceeded`` (a
    size) or ``MalformedInput`` (a shape), naming the entry."""
    bounded(len(reports), limits.max_gpus, "EvidenceBody.gpu_reports", "max_gpus")
    seen: set[int] = set()
    for i, r in enumerate(reports):
        where = f"EvidenceBody.gpu_reports[{i}]"
        if r.index not in gpus:
            listed = ", ".join(map(str, sorted(gpus))) or "none"
            raise MalformedInput(
                f"{where}: GPU index {r.index} is not a GPU of EvidenceBody.gpu.gpus "
                f"(indices listed: {listed})"
            )
        if r.index in seen:
            raise MalformedInput(f"{where}: GPU index {r.index} has a report already")
        seen.add(r.index)
        if r.status not in STATUSES:
            raise MalformedInput(
                f"{where}.status: expected one of {', '.join(STATUSES)}, got {r.status[:64]!r}"
            )
        _check_gpu_sizes(r, where)
        if r.status == REPORT and (not r.report or not r.certificates):
            missing = "report" if not r.report else "certificates"
            raise MalformedInput(
                f"{where}: status report without {missing}: a report needs the report "
                "and at least one certificate"
            )
        if r.status != REPORT and (r.report or r.certificates):
            raise MalformedInput(
                f"{where}: status {r.status} with a report or certificates: only status "
                "report carries them"
            )


def _check_gpu_sizes(r: attestation_pb2.GpuReport, where: str) -> None:
    if len(r.detail) > MAX_GPU_DETAIL:
        raise LimitExceeded(
            f"{where}.detail: {len(r.detail)} characters, more than {MAX_GPU_DETAIL}"
        )
    if len(r.report) > MAX_GPU_REPORT:
        raise LimitExceeded(f"{where}.report: {len(r.report)} bytes, more than {MAX_GPU_REPORT}")
    if len(r.certificates) > MAX_GPU_CERTIFICATES:
        raise LimitExceeded(
            f"{where}.certificates: {len(r.certificates)} certificates, more than "
            f"{MAX_GPU_CERTIFICATES}"
        )
    for j, der in enumerate(r.certificates):
        if len(der) > MAX_GPU_CERTIFICATE:
            raise LimitExceeded(
                f"{where}.certificates[{j}]: {len(der)} bytes, more than {MAX_GPU_CERTIFICATE}"
            )


def gpu_evidence(body: attestation_pb2.EvidenceBody) -> tuple[GpuEvidence, ...]:
    """The GPU reports of a body ``check_body_limits`` passed, as domain values."""
    return tuple(
        GpuEvidence(
            index=r.index,
            status=r.status,
            detail=r.detail,
            report=r.report,
            certificates=tuple(r.certificates),
        )
        for r in body.gpu_reports
    )
