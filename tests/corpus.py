"""Where the conformance corpus is: real TCG event logs, EK certificates and roots, quotes and
nvidia-smi captures that nobody on this team wrote (tests/data/corpus; provenance in its
MANIFEST.md and gpu/README.md, licence texts in LICENSES/ and beside the GPU captures).
A clone runs every corpus test as it is; DEVTRUST_CORPUS points the tests at another copy.
A missing corpus fails the tests that need it (at collection), never skips them."""

from __future__ import annotations

import os
from pathlib import Path

IN_REPO = Path(__file__).resolve().parent / "data" / "corpus"


def corpus_root() -> Path:
    """The corpus directory; FileNotFoundError, naming both places, when it is absent."""
    chosen = os.environ.get("DEVTRUST_CORPUS")
    root = Path(chosen) if chosen else IN_REPO
    if not (root / "expected.json").is_file():
        where = f"DEVTRUST_CORPUS={chosen}" if chosen else str(IN_REPO)
        raise FileNotFoundError(
            f"conformance corpus: no expected.json under {where}; the corpus is part of the "
            "repository (tests/data/corpus), restore it or point DEVTRUST_CORPUS at a copy"
        )
    return root
