"""Regenerate the Python code for protos/devtrust/{v1,spiffe,example}: `python -m protos.generate`.

``protos/`` is the proto root: the files are ``devtrust/v1/*.proto`` with package ``devtrust.v1``,
so every language generates from them with ordinary import paths, and the Python code imports
as ``devtrust.v1``. ``devtrust/spiffe/workload.proto`` is the SPIFFE Workload API, without a
package as its specification has it (the agent serves it to local workloads); its Python code
imports as ``devtrust.spiffe``. ``devtrust/example/registry.proto`` is the example relying
party's own service (package ``devtrust.example``), generated beside its code.

The generated modules (``*_pb2.py``, ``*_pb2_grpc.py``) and their ``.pyi`` stubs are checked
in; ``tests/test_protos_fresh.py`` regenerates into a temporary directory and fails when the
checked-in files differ. Tool versions are pinned in pyproject.toml's ``dev`` extra.

``make protos`` runs this and then ``python -m devtrust.verifier.wire_schema --write``, which
regenerates the evidence document's schema (verifier/data/document_schema.json) from the new
descriptors; ``tests/test_document_schema_fresh.py`` fails when that file is stale. Run both
after changing a .proto.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_DIR = Path("devtrust/v1")
PROTO_DIRS = (PROTO_DIR, Path("devtrust/spiffe"), Path("devtrust/example"))


def _plugin(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is None:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return which


def generate(out_dir: Path) -> list[Path]:
    """Generate code for every .proto into out_dir (mirroring PROTO_DIRS under the proto root)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(
        str(p.relative_to(PROTO_ROOT))
        for folder in PROTO_DIRS
        for p in (PROTO_ROOT / folder).glob("*.proto")
    )
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return sorted(p for folder in PROTO_DIRS for p in (out_dir / folder).glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
