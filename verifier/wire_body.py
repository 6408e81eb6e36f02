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
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.config import LimitsConfig
from devtrust.verifier.errors import LimitExceeded, MalformedInput

_INT64_MAX = 2**63 - 1
_UNSIGNED_64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)


def _int64(value: int) -> int:
    return min(value, _INT64_MAX)


def plain(msg: Message) -> dict[str, Any]:
    """A message as dicts: every field present; unset optional fields and unset sub-messages
    are None (a value the host could not read is null, never false); bytes are hex; uint64
    values above int64 are saturated (a CEL int, like every other integer: the CEL runtime
    would make them a ``uint``, and int and uint do not mix in arithmetic)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.is_repeated:
            out[field.name] = [
                plain(v)
                if isinstance(v, Message)
                else _int64(v)
                if field.type in _UNSIGNED_64
                else v
                for v in value
            ]
        elif field.has_presence and not msg.HasField(field.name):
            out[field.name] = None
        elif isinstance(value, Message):
            out[field.name] = plain(value)
        elif isinstance(value, bytes):
            out[field.name] = value.hex()
        elif field.type in _UNSIGNED_64:
            out[field.name] = _int64(value)
        else:
            out[field.name] = value
    return out


class WireBody:
    """The verifier.appraisal ``BodyDocument`` of a received evidence body: its policy values
    converted at the first ``plain()`` call and kept, and its posture digest.

    It owns the message it is given (``body_from_wire`` makes one for it): nothing else holds
    a reference that could change the message under the cached values."""

    __slots__ = ("_digest", "_msg", "_plain")

    def __init__(self, msg: attestation_pb2.EvidenceBody) -> None:
        self._msg = msg
        self._plain: dict[str, Any] | None = None
        self._digest = ""

    @property
    def posture_digest(self) -> str:
        """The policy's cache key: which of host, os and gpu were sent (an absent part and an
        empty one differ to required_evidence) and their bytes, each length-prefixed;
        collected_at and the certify key, which change at every evidence, are left out."""
        if not self._digest:
            msg = self._msg
            digest = hashlib.sha256()
            for part, sent in (
                (msg.host, msg.HasField("host")),
                (msg.os, msg.HasField("os")),
                (msg.gpu, msg.HasField("gpu")),
            ):
                data = part.SerializeToString(deterministic=True)
                digest.update((b"\x01" if sent else b"\x00") + len(data).to_bytes(8, "big") + data)
            self._digest = digest.hexdigest()
        return self._digest

    def plain(self) -> Mapping[str, Any]:
        """host, os and gpu (and the rest of the body) as plain values; a part the body did
        not carry is None. Read-only: every appraisal of this evidence shares them."""
        if self._plain is None:
            self._plain = plain(self._msg)
        return self._plain


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
    for i, g in enumerate(gpu.gpus):
        where = f"EvidenceBody.gpu.gpus[{i}]"
        if g.index in seen:  # GPU results (submods) are keyed by index
            raise MalformedInput(f"{where}: GPU index {g.index} is reported twice")
        seen.add(g.index)
        bounded(
            len(g.nvlinks), limits.max_nvlinks_per_gpu, f"{where}.nvlinks", "max_nvlinks_per_gpu"
        )
        bounded(
            len(g.mig_devices),
            limits.max_mig_devices_per_gpu,
            f"{where}.mig_devices",
            "max_mig_devices_per_gpu",
        )
        bounded(
            len(g.recent_xids), limits.max_xids_per_gpu, f"{where}.recent_xids", "max_xids_per_gpu"
        )
        bounded(
            len(g.unavailable), limits.max_unavailable, f"{where}.unavailable", "max_unavailable"
        )
        bounded(len(g.cc_settings), maps, f"{where}.cc_settings", "max_map_entries")
        bounded(len(g.fabric_health), maps, f"{where}.fabric_health", "max_map_entries")
