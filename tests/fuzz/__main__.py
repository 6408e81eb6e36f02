"""The long fuzzing runs: ``python -m tests.fuzz NAME|all [--runs N]`` (``make fuzz``).

Each harness of ``tests.fuzz.targets`` runs under atheris (coverage-guided, libFuzzer) in a
process of its own, seeded with ``tests.fuzz.seeds`` written to a temporary corpus
directory, for ``--runs`` inputs. Each prints one line, the inputs run, the time and the
rate, and whether it crashed; a crash (an exception other than the parser's domain errors, a
timeout or running out of memory) leaves the input under ``--artifacts`` and makes the
command exit 1. libFuzzer's own output goes to ``--logs``, one file per harness.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.targets import TARGETS, Target

_DONE = re.compile(rb"stat::number_of_executed_units: (\d+)")
_RUNS = re.compile(rb"#(\d+)\s")


@dataclass(frozen=True)
class Outcome:
    name: str
    inputs: int
    seconds: float
    crashes: tuple[Path, ...]
    returncode: int

    def line(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        head = f"{self.name}: {self.inputs} inputs in {self.seconds:.0f} s ({rate:.0f}/s)"
        if self.returncode == 0 and not self.crashes:
            return f"{head}, no crash"
        saved = ", ".join(map(str, self.crashes)) or "no input saved"
        return f"{head}, CRASH (exit {self.returncode}): {saved}"


def run_one(
    target: Target,
    *,
    runs: int,
    artifacts: Path,
    logs: Path,
    timeout_s: int,
    child: str = "tests.fuzz.atheris_main",
) -> Outcome:
    """Run ``target`` under atheris in ``child`` (a module that takes the harness's name and
    libFuzzer's flags) for ``runs`` inputs."""
    name = target.name
    artifacts.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    with tempfile.TemporaryDirectory(prefix=f"devtrust-fuzz-{name}-") as corpus:
        for i, seed in enumerate(target.seeds()):
            (Path(corpus) / f"seed-{i:03d}").write_bytes(seed)
        argv = [
            sys.executable,
            "-m",
            child,
            name,
            f"-runs={runs}",
            f"-max_len={target.max_len}",
            f"-artifact_prefix={artifacts}/{name}-",
            f"-timeout={timeout_s}",
            "-rss_limit_mb=3072",
            "-print_final_stats=1",
            corpus,
        ]
        log = logs / f"{name}.log"
        start = time.monotonic()
        with log.open("wb") as out:
            returncode = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - start
    text = log.read_bytes()
    done = _DONE.findall(text)
    inputs = int(done[-1]) if done else max((int(n) for n in _RUNS.findall(text)), default=0)
    # Inputs this harness saved (libFuzzer names them crash-, timeout-, oom-, leak-...).
    crashes = tuple(
        sorted(p for p in set(artifacts.iterdir()) - before if p.name.startswith(f"{name}-"))
    )
    return Outcome(name, inputs, seconds, crashes, returncode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("names", nargs="+", help=f"harnesses, or all: {', '.join(TARGETS)}")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per harness")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    parser.add_argument("--logs", type=Path, default=Path("fuzz-artifacts/logs"))
    parser.add_argument("--timeout", type=int, default=30, help="seconds one input may take")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; one of {', '.join(TARGETS)}")
    failed = False
    for name in names:
        outcome = run_one(
            TARGETS[name],
            runs=args.runs,
            artifacts=args.artifacts.resolve(),
            logs=args.logs.resolve(),
            timeout_s=args.timeout,
        )
        print(outcome.line(), flush=True)
        failed = failed or outcome.returncode != 0 or bool(outcome.crashes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
