"""One harness under atheris: ``python -m tests.fuzz.atheris_main NAME [libFuzzer flags]``.
Started by ``python -m tests.fuzz``, which passes the flags and reads the output.

devtrust's modules are imported inside ``instrument_imports`` so that libFuzzer sees their
branch coverage; the libraries under them (protobuf, PyYAML, cryptography) are not
instrumented, which keeps the rate up.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["devtrust"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    name, flags = sys.argv[1], sys.argv[2:]
    check = TARGETS[name].check
    atheris.Setup([sys.argv[0], *flags], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
