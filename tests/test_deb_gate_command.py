"""`devtrust-gate`, the command of the devtrust-gate package (a relying party's host, no
verifier): `check` decides as `devtrust gate check` does, on the same files, with the same
output and exit status; `--version` names it.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import pytest

from devtrust.gate.command import main as gate_main
from devtrust.verifier.cli import main as devtrust_main
from tests.test_gate import Files, files, pki  # noqa: F401 - fixtures of the gate's tests

Result = tuple[int, str, str]


def _run(capsys: pytest.CaptureFixture[str], call: Callable[[], int]) -> Result:
    try:
        status = call()
    except SystemExit as exc:  # argparse: usage errors, --version
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(lambda f: [f.good, "--ca-bundle", f.bundle], id="allowed"),
        pytest.param(
            lambda f: [f.wrong_zone, "--ca-bundle", f.bundle, "--zone", "staging"], id="zone"
        ),
        pytest.param(
            lambda f: [f.revoked, "--ca-bundle", f.bundle, "--crl", f.crl, "--json"], id="revoked"
        ),
        pytest.param(lambda f: [f.good, "--ca-bundle", f.good], id="not-a-ca"),
        pytest.param(lambda f: [f.good], id="no-bundle"),
    ],
)
def test_devtrust_gate_check_is_devtrust_gate_check(
    argv: Callable[[Files], list[Path | str]],
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    made: Files = request.getfixturevalue("files")
    args = [str(a) for a in argv(made)]
    alone = _run(capsys, lambda: gate_main(["check", *args]))
    within = _run(capsys, lambda: devtrust_main(["gate", "check", *args]))
    # argparse names the program in usage errors: devtrust-gate check / devtrust gate check.
    assert alone[:2] == within[:2]
    assert alone[2].replace("devtrust-gate check", "devtrust gate check") == within[2]
    assert alone[1] or alone[2]


def test_devtrust_gate_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, lambda: gate_main(["--version"]))
    assert (status, out) == (0, f"devtrust-gate {importlib.metadata.version('devtrust')}\n")
    status, _, err = _run(capsys, lambda: gate_main([]))
    assert status == 2
    assert "required: action" in err
