"""Where the conformance corpus is: real TCG event logs, EK certificates and roots, quotes and
nvidia-smi captures that nobody on this team wrote (tests/data/corpus; provenance in its
MANIFEST.md and gpu/README.md, licence texts in LICENSES/ and beside the GPU captures).
A clone runs every corpus test as it is; DEVTRUST_CORPUS points the tests at another copy."""

from __future__ import annotations

import os
from pathlib import Path

IN_REPO = Path(__file__).resolve().parent / "data" / "corpus"


def corpus_root() -> str | None:
    """The corpus directory (str, as the tests join paths onto it), None when absent."""
    chosen = os.environ.get("DEVTRUST_CORPUS")
    if chosen:
        return chosen
    return str(IN_REPO) if IN_REPO.is_dir() else None
