"""The checked-in generated code is what `make protos` produces from the .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.generate import PROTO_DIRS, PROTO_ROOT, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    names = [path.relative_to(tmp_path) for path in fresh]
    for folder in PROTO_DIRS:
        assert any(name.parent == folder for name in names), f"nothing generated in {folder}"
    stale = [
        str(name)
        for path, name in zip(fresh, names, strict=True)
        if not (PROTO_ROOT / name).exists() or (PROTO_ROOT / name).read_bytes() != path.read_bytes()
    ]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"
    checked_in = {
        p.relative_to(PROTO_ROOT)
        for folder in PROTO_DIRS
        for p in (PROTO_ROOT / folder).glob("*_pb2*.py*")
    }
    assert checked_in == set(names), "generated files without a .proto"
