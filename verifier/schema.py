"""The declared schema of the evidence document (verifier/document.py): the types policy rules
are checked against at load (verifier/celcheck.py). Pure: it imports no protobuf (issue 9,
item 4).

The fields of the evidence body (HostFacts, OsPosture, GpuState and what they hold) are read
from verifier/data/document_schema.json, which the wire layer writes from the protobuf
descriptors as ``wire_body.plain`` converts them (verifier/wire_schema.py, ``make protos``;
tests/test_document_schema_fresh.py keeps it current): bytes are hex strings, enums and every
integer width are CEL ``int`` (``plain`` keeps uint64 values in int64), a map field is a CEL
map. To that are added the fields ``document.build`` derives (``gpu.branch``,
``gpu.missing_bulletins``, per GPU ``lost`` and ``gsp_matches_driver``, ``device``, ``sent``),
and it drops what build drops: the host's own claim of its zone and labels, kept apart as
*withheld* fields: a rule that names one is refused at load, with the reason.

Nullability is not part of the schema: an optional field the host could not read is null in
the document whatever its type, and a rule over it reads as unknown at appraisal (with the
field named), never as compliant or as off.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

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


# What verifier/wire_schema.py writes: {"root": name, "messages": {name: {"name", "fields"}}},
# each field's type a {"kind", ...} object. Read once, at import.
_WIRE: Mapping[str, Any] = json.loads(
    resources.files("devtrust.verifier")
    .joinpath("data/document_schema.json")
    .read_text(encoding="utf-8")
)
_KINDS = {"bool": BOOL, "int": INT, "double": DOUBLE, "string": STRING, "bytes": BYTES}


def _type(spec: Mapping[str, Any]) -> Type:
    kind = spec["kind"]
    if kind == "list":
        return list_of(_type(spec["elem"]))
    if kind == "map":
        return map_of(_type(spec["key"]), _type(spec["value"]))
    if kind == "message":
        return _message(spec["message"])
    return _KINDS[kind]


def _message(
    name: str, extra: Mapping[str, Type] | None = None, drop: Mapping[str, str] | None = None
) -> Type:
    """The message of full name ``name``, with the fields ``extra`` added and ``drop`` withheld."""
    desc = _WIRE["messages"][name]
    fields = {f: _type(t) for f, t in desc["fields"].items() if f not in (drop or {})}
    return message(desc["name"], {**fields, **(extra or {})}, drop)


def _of(name: str, field_name: str) -> str:
    """The full name of the message type of field ``field_name`` of message ``name`` (of its
    elements, for a list)."""
    spec = _WIRE["messages"][name]["fields"][field_name]
    if spec["kind"] == "list":
        spec = spec["elem"]
    if spec["kind"] != "message":
        raise TypeError(f"{name}.{field_name} is not a message")
    return str(spec["message"])


_BODY = str(_WIRE["root"])
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
