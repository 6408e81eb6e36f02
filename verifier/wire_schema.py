"""The types of what ``wire_body.plain`` makes of an evidence body, read from the protobuf
descriptors and written as plain JSON (verifier/data/document_schema.json), so that the policy
schema (verifier/schema.py) is declared without importing protobuf (issue 9, item 4) and still
has one source of truth: the .proto files. ``tests/test_document_schema_fresh.py`` fails when
the checked-in file is not what the descriptors give.

Regenerate after changing a .proto: ``make protos``, or
``python -m devtrust.verifier.wire_schema --write``.

A field's type is a JSON object whose ``kind`` is the CEL type of the value ``plain`` gives:
``bool``, ``int`` (every integer width and enums; ``plain`` keeps uint64 in int64),
``double``, ``string`` (singular bytes too: ``plain`` writes them as hex), ``bytes`` (bytes in
a list or map, which ``plain`` leaves as they are), ``list`` (with ``elem``), ``map`` (with
``key`` and ``value``) or ``message`` (with ``message``, its full name in ``messages``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from devtrust.v1 import attestation_pb2

PATH = Path(__file__).resolve().parent / "data" / "document_schema.json"
COMMAND = "python -m devtrust.verifier.wire_schema --write"

_SCALARS = {
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "string",  # plain() writes singular bytes as hex
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "double",
}


class SchemaError(ValueError):
    """A message ``plain`` cannot give policy as plain values, or the schema cannot hold."""


def _single(fd: FieldDescriptor, found: dict[str, Any], within: tuple[str, ...]) -> dict[str, Any]:
    if fd.message_type is not None:
        _walk(fd.message_type, found, within)
        return {"kind": "message", "message": fd.message_type.full_name}
    return {"kind": _SCALARS.get(fd.type, "int")}  # every integer width and enums


def _field(fd: FieldDescriptor, found: dict[str, Any], within: tuple[str, ...]) -> dict[str, Any]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        entry = fd.message_type.fields_by_name
        key, value = entry["key"], entry["value"]
        if value.message_type is not None:
            # plain() copies a map as it is: its values would stay messages.
            raise SchemaError(
                f"{fd.full_name}: a map of messages; wire_body.plain converts only maps of scalars"
            )
        return {"kind": "map", "key": _raw(key), "value": _raw(value)}
    if fd.is_repeated:
        elem = _single(fd, found, within) if fd.message_type is not None else _raw(fd)
        return {"kind": "list", "elem": elem}
    return _single(fd, found, within)


def _raw(fd: FieldDescriptor) -> dict[str, Any]:
    """A scalar in a list or map: plain() keeps its bytes as bytes."""
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return {"kind": "bytes"}
    return {"kind": _SCALARS.get(fd.type, "int")}


def _walk(desc: Descriptor, found: dict[str, Any], within: tuple[str, ...]) -> None:
    """Adds ``desc`` and every message it holds to ``found``, by full name; ``within`` are the
    messages that hold it, to refuse recursion (the policy schema is a finite tree)."""
    if desc.full_name in within:
        raise SchemaError(
            f"{desc.full_name} holds itself ({' > '.join((*within, desc.full_name))}): "
            "the policy schema is a tree"
        )
    if desc.full_name in found:
        return
    entry: dict[str, Any] = {"name": desc.name, "fields": {}}
    found[desc.full_name] = entry
    inner = (*within, desc.full_name)
    for fd in desc.fields:
        entry["fields"][fd.name] = _field(fd, found, inner)


def body_schema(root: Descriptor = attestation_pb2.EvidenceBody.DESCRIPTOR) -> dict[str, Any]:
    """The types of ``plain(body)`` for a message of type ``root``: ``root`` (its full name)
    and ``messages`` (each message it holds, at any depth, by full name: its short ``name``
    and its ``fields`` in declaration order). Raises ``SchemaError``."""
    found: dict[str, Any] = {}
    _walk(root, found, ())
    return {
        "generated_by": f"make protos ({COMMAND}); do not edit",
        "root": root.full_name,
        "messages": dict(sorted(found.items())),
    }


def render(schema: dict[str, Any]) -> str:
    """The file's text: one line per field, so that a change to a .proto is a small diff."""

    def dump(value: Any) -> str:
        return json.dumps(value, separators=(", ", ": "))

    messages = []
    for full_name, entry in schema["messages"].items():
        lines = [f"        {dump(n)}: {dump(t)}" for n, t in entry["fields"].items()]
        fields = "{\n" + ",\n".join(lines) + "\n      }" if lines else "{}"
        messages.append(
            f"    {dump(full_name)}: {{\n"
            f'      "name": {dump(entry["name"])},\n'
            f'      "fields": {fields}\n'
            "    }"
        )
    head = "".join(f"  {dump(k)}: {dump(v)},\n" for k, v in schema.items() if k != "messages")
    return "{\n" + head + '  "messages": {\n' + ",\n".join(messages) + "\n  }\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtrust.verifier.wire_schema",
        description="Print the evidence document's wire schema, or write it to the package.",
    )
    parser.add_argument("--write", action="store_true", help=f"write {PATH}")
    args = parser.parse_args(argv)
    text = render(body_schema())
    if args.write:
        PATH.write_text(text, encoding="utf-8")
        print(PATH)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
