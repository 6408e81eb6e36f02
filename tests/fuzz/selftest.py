"""A harness that crashes on purpose, run by tests/test_fuzz_runner.py through the long-run
runner (``tests.fuzz.__main__.run_one``): a crash must fail the run and leave its input."""

from __future__ import annotations

import sys

import atheris

from tests.fuzz.targets import Target

PLANTED = b"crash:"


def check(data: bytes) -> None:
    if data.startswith(PLANTED):
        raise IndexError("a planted crash")


TARGET = Target("selftest", check, lambda: (b"fine", PLANTED + b" here"), 64)


def main() -> None:
    atheris.Setup([sys.argv[0], *sys.argv[2:]], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
