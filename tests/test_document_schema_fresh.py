"""The checked-in schema of the evidence body (verifier/data/document_schema.json, which the
pure policy schema verifier/schema.py reads) is what the protobuf descriptors give, and it
describes what ``wire_body.plain`` really makes of a body (issue 9, item 4)."""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.wire_body import plain
from devtrust.verifier.wire_schema import COMMAND, PATH, SchemaError, body_schema, render

if TYPE_CHECKING:
    # What ``Message.DESCRIPTOR.fields`` may also hold, per types-protobuf (the C descriptors).
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

_PYTHON = {"bool": bool, "int": int, "double": float, "string": str, "bytes": bytes}
_SCALARS: dict[int, bool | float | str | bytes] = {
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_STRING: "x",
    FieldDescriptor.TYPE_BYTES: b"\x01",
    FieldDescriptor.TYPE_DOUBLE: 1.5,
    FieldDescriptor.TYPE_FLOAT: 1.5,
}


def test_the_checked_in_schema_is_fresh() -> None:
    """Read where verifier/schema.py reads it (the installed package) and where the command
    writes it (the source tree): the same file, and current."""
    installed = (
        resources.files("devtrust.verifier")
        .joinpath("data/document_schema.json")
        .read_text(encoding="utf-8")
    )
    assert installed == PATH.read_text(encoding="utf-8")
    assert installed == render(body_schema()), (
        f"{PATH.name} is stale: the .proto files changed; run `make protos` (or `{COMMAND}`)"
    )


def test_the_file_is_the_json_of_the_schema() -> None:
    schema = body_schema()
    assert json.loads(render(schema)) == schema
    assert schema["root"] == "devtrust.v1.EvidenceBody"
    assert {"devtrust.v1.HostFacts", "devtrust.v1.Gpu", "google.protobuf.Timestamp"} <= set(
        schema["messages"]
    )


def _fill(msg: Message) -> None:
    """Every field of ``msg`` set, at every depth, and one element in every list and map."""
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            entry = fd.message_type.fields_by_name
            value[_scalar(entry["key"])] = _scalar(entry["value"])
        elif fd.message_type is not None:
            _fill(value.add() if fd.is_repeated else value)
        elif fd.is_repeated:
            value.append(_scalar(fd))
        else:
            setattr(msg, fd.name, _scalar(fd))


def _scalar(fd: FieldDescriptor | UpbFieldDescriptor) -> bool | float | str | bytes:
    if fd.enum_type is not None:
        return fd.enum_type.values[-1].number
    return _SCALARS.get(fd.type, 2**64 - 1 if fd.type in (fd.TYPE_UINT64, fd.TYPE_FIXED64) else 1)


def _differences(
    spec: dict[str, Any], value: Any, messages: dict[str, Any], where: str
) -> list[str]:
    """Where ``value`` (at ``where``) is not of the type ``spec``, at every depth."""
    kind = spec["kind"]
    inner: list[tuple[dict[str, Any], Any, str]] = []
    if kind == "message":
        fields = messages[spec["message"]]["fields"]
        fits = isinstance(value, dict) and set(value) == set(fields)
        if fits:
            inner = [(t, value[name], f"{where}.{name}") for name, t in fields.items()]
    elif kind == "list":
        fits = isinstance(value, list) and len(value) == 1
        if fits:
            inner = [(spec["elem"], value[0], f"{where}[0]")]
    elif kind == "map":
        fits = isinstance(value, dict) and len(value) == 1
        if fits:
            [(key, item)] = value.items()
            inner = [(spec["key"], key, f"{where} key"), (spec["value"], item, f"{where}[{key!r}]")]
    else:
        fits = type(value) is _PYTHON[kind]
    if not fits:
        return [f"{where}: {value!r} is not of type {spec}"]
    return [d for t, v, w in inner for d in _differences(t, v, messages, w)]


def test_the_schema_describes_what_plain_makes() -> None:
    """On a body with every field set, each value plain() gives has the declared kind: a
    field whose conversion changes in plain() and not in the walk (or back) fails here."""
    body = attestation_pb2.EvidenceBody()
    _fill(body)
    schema = body_schema()
    root = {"kind": "message", "message": schema["root"]}
    assert _differences(root, plain(body), schema["messages"], "body") == []
    # and on a message with lists and maps of bytes and integers
    bank = common_pb2.PcrBank()
    _fill(bank)
    spec = body_schema(common_pb2.PcrBank.DESCRIPTOR)
    pcr_bank = {"kind": "message", "message": spec["root"]}
    assert _differences(pcr_bank, plain(bank), spec["messages"], "bank") == []
    assert spec["messages"][spec["root"]]["fields"]["values"] == {
        "kind": "map",
        "key": {"kind": "int"},
        "value": {"kind": "bytes"},
    }


_PROTO = descriptor_pb2.FieldDescriptorProto


def _descriptor(fields: list[descriptor_pb2.FieldDescriptorProto], *, entry: bool) -> Descriptor:
    """A message ``t.M`` of ``fields``, with a map entry ``t.M.E`` (string to ``t.M``) when
    ``entry`` is set, in a pool of its own."""
    proto = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    m = proto.message_type.add(name="M")
    m.field.extend(fields)
    if entry:
        e = m.nested_type.add(name="E")
        e.options.map_entry = True
        e.field.add(name="key", number=1, type=_PROTO.TYPE_STRING, label=_PROTO.LABEL_OPTIONAL)
        e.field.add(name="value", number=2, type=_PROTO.TYPE_MESSAGE, label=_PROTO.LABEL_OPTIONAL)
        e.field[1].type_name = ".t.M"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    desc = pool.FindMessageTypeByName("t.M")
    GetMessageClass(desc)  # a valid message
    return desc


def test_a_message_that_holds_itself_is_refused() -> None:
    field = descriptor_pb2.FieldDescriptorProto(
        name="next",
        number=1,
        type=_PROTO.TYPE_MESSAGE,
        label=_PROTO.LABEL_OPTIONAL,
        type_name=".t.M",
    )
    with pytest.raises(SchemaError, match=r"t\.M holds itself \(t\.M > t\.M\)"):
        body_schema(_descriptor([field], entry=False))


def test_a_map_of_messages_is_refused() -> None:
    """plain() copies a map as it is: its values would reach policy as protobuf messages."""
    field = descriptor_pb2.FieldDescriptorProto(
        name="by_name",
        number=1,
        type=_PROTO.TYPE_MESSAGE,
        label=_PROTO.LABEL_REPEATED,
        type_name=".t.M.E",
    )
    with pytest.raises(SchemaError, match=r"t\.M\.by_name: a map of messages"):
        body_schema(_descriptor([field], entry=True))
