"""Timing shared by the benchmarks."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

IN_REPO_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus"


def corpus_root() -> str | None:
    """The conformance corpus: $DEVTRUST_CORPUS, else the copy in tests/data/corpus."""
    return os.environ.get("DEVTRUST_CORPUS") or (
        str(IN_REPO_CORPUS) if IN_REPO_CORPUS.is_dir() else None
    )


def rates(fns: list[Callable[[], object]], rounds: int, repeats: int) -> list[float]:
    """Median calls per second of each function; the functions alternate within each repeat,
    so machine noise hits them alike."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            start = time.perf_counter()
            for _ in range(rounds):
                fn()
            out.append(rounds / (time.perf_counter() - start))
    return [statistics.median(s) for s in samples]
