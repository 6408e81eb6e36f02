"""The checked-in generated code is what `make protos` produces from the .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.generate import PROTO_DIR, PROTO_ROOT, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    stale = [
        str(PROTO_DIR / path.name)
        for path in fresh
        if not (PROTO_ROOT / PROTO_DIR / path.name).exists()
        or (PROTO_ROOT / PROTO_DIR / path.name).read_bytes() != path.read_bytes()
    ]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"
    checked_in = {p.name for p in (PROTO_ROOT / PROTO_DIR).glob("*_pb2*.py*")}
    assert checked_in == {p.name for p in fresh}, "generated files without a .proto"
