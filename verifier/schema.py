"""The declared schema of the evidence document (verifier/document.py): the types policy rules
are checked against at load (verifier/celcheck.py). Pure.

It is derived from the protobuf descriptors of the evidence body (HostFacts, OsPosture,
GpuState and what they hold), as ``document.plain`` converts them: bytes are hex strings,
enums and every integer width are CEL ``int`` (``plain`` keeps uint64 values in int64), a map
field is a CEL map. To that are added the fields ``document.build`` derives (``gpu.branch``,
``gpu.missing_bulletins``, per GPU ``lost`` and ``gsp_matches_driver``, ``device``, ``sent``),
and it drops what build drops: the host's own claim of its zone and labels, kept apart as
*withheld* fields: a rule that names one is refused at load, with the reason.

Nullability is not part of the schema: an optional field the host could not read is null in
the document whatever its type, and a rule over it reads as unknown at appraisal (with the
field named), never as compliant or as off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from devtrust.v1 import attestation_pb2

# Why the host's own zone and labels are not in the document (verifier/celcheck.py says so
# when a rule names them).
WITHHELD = (
    "the verifier never takes a host's claim of its zone or labels; rules read device.zone "
    "and device.labels, the operator's assignment"
)


@dataclass(frozen=True, eq=False)
class Type:
    """A CEL type: ``kind`` is bool, int, uint, double, string, bytes, null, list, map,
    message (a map with known fields: what the document holds), timestamp, duration, type
    or dyn (unknown until evaluation)."""

    kind: str
    elem: Type | None = None  # list: the element; map: the value
    key: Type | None = None  # map: the key
    name: str = ""  # message: its name
    fields: Mapping[str, Type] = field(default_factory=dict)  # message: its fields
    withheld: Mapping[str, str] = field(default_factory=dict)  # message: name -> why absent

    def __str__(self) -> str:
        if self.kind == "list":
            return f"list<{self.elem}>"
        if self.kind == "map":
            return f"map<{self.key}, {self.elem}>"
        return self.name or self.kind


BOOL, INT, UINT, DOUBLE = Type("bool"), Type("int"), Type("uint"), Type("double")
STRING, BYTES, NULL, DYN = Type("string"), Type("bytes"), Type("null"), Type("dyn")
TIMESTAMP, DURATION, TYPE = Type("timestamp"), Type("duration"), Type("type")


def list_of(elem: Type) -> Type:
    return Type("list", elem=elem)


def map_of(key: Type, value: Type) -> Type:
    return Type("map", elem=value, key=key)


def message(
    name: str, fields: Mapping[str, Type], withheld: Mapping[str, str] | None = None
) -> Type:
    return Type("message", name=name, fields=dict(fields), withheld=dict(withheld or {}))


_SCALARS = {
    FieldDescriptor.TYPE_BOOL: BOOL,
    FieldDescriptor.TYPE_STRING: STRING,
    FieldDescriptor.TYPE_BYTES: STRING,  # plain() writes bytes as hex
    FieldDescriptor.TYPE_DOUBLE: DOUBLE,
    FieldDescriptor.TYPE_FLOAT: DOUBLE,
}


def _single(fd: FieldDescriptor) -> Type:
    if fd.message_type is not None:
        return _message(fd.message_type)
    return _SCALARS.get(fd.type, INT)  # every integer width and enums: CEL int


def _field(fd: FieldDescriptor) -> Type:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        entry = fd.message_type.fields_by_name
        return map_of(_single(entry["key"]), _single(entry["value"]))
    return list_of(_single(fd)) if fd.is_repeated else _single(fd)


def _message(
    desc: Descriptor, extra: Mapping[str, Type] | None = None, drop: Mapping[str, str] | None = None
) -> Type:
    fields = {fd.name: _field(fd) for fd in desc.fields if fd.name not in (drop or {})}
    return message(desc.name, {**fields, **(extra or {})}, drop)


def _of(desc: Descriptor, name: str) -> Descriptor:
    """The message type of field ``name`` of ``desc``."""
    sub = desc.fields_by_name[name].message_type
    if sub is None:
        raise TypeError(f"{desc.name}.{name} is not a message")
    return sub


_BODY = attestation_pb2.EvidenceBody.DESCRIPTOR
_GPU_STATE = _of(_BODY, "gpu")
BULLETIN = message(
    "Bulletin",
    {
        "bulletin": STRING,
        "title": STRING,
        "fixed": STRING,
        "cves": list_of(STRING),
        "max_cvss": DOUBLE,
    },
)
GPU = _message(
    _of(_GPU_STATE, "gpus"),
    {"lost": BOOL, "gsp_matches_driver": BOOL},
)
DOCUMENT: Mapping[str, Type] = {
    "host": _message(_of(_BODY, "host"), drop=dict.fromkeys(("zone", "labels"), WITHHELD)),
    "os": _message(_of(_BODY, "os")),
    "gpu": _message(
        _GPU_STATE,
        {"branch": STRING, "missing_bulletins": list_of(BULLETIN), "gpus": list_of(GPU)},
    ),
    "device": message("Device", {"zone": STRING, "labels": map_of(STRING, STRING)}),
    "sent": message("Sent", {"host": BOOL, "os": BOOL, "gpu": BOOL}),
}
"""The names a host rule reads; a GPU rule reads these and ``this``, the GPU in scope."""
THIS = GPU
