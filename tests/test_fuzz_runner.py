"""Issue 12, item 5: the long-run command (``python -m tests.fuzz``, ``make fuzz``) reports
the inputs it ran, passes a harness without a crash, and fails with the input saved when a
harness crashes (tests/fuzz/selftest.py plants one)."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz import selftest
from tests.fuzz.__main__ import main, run_one
from tests.fuzz.targets import TARGETS


def test_a_clean_run_reports_its_inputs(tmp_path: Path) -> None:
    outcome = run_one(
        TARGETS["tpmt_signature"],
        runs=3000,
        artifacts=tmp_path / "artifacts",
        logs=tmp_path / "logs",
        timeout_s=30,
    )
    assert (outcome.inputs, outcome.returncode, outcome.crashes) == (3000, 0, ())
    assert outcome.line().startswith("tpmt_signature: 3000 inputs in ")
    assert outcome.line().endswith("no crash")


def test_a_crash_fails_the_run_and_keeps_the_input(tmp_path: Path) -> None:
    outcome = run_one(
        selftest.TARGET,
        runs=1000,
        artifacts=tmp_path / "artifacts",
        logs=tmp_path / "logs",
        timeout_s=30,
        child="tests.fuzz.selftest",
    )
    assert outcome.returncode != 0
    [saved] = outcome.crashes
    assert saved.name.startswith("selftest-crash-")
    assert saved.read_bytes().startswith(selftest.PLANTED)
    assert "CRASH" in outcome.line()
    assert "a planted crash" in (tmp_path / "logs" / "selftest.log").read_text()


def test_command_exits_zero_without_a_crash(tmp_path: Path) -> None:
    args = ["tpm2b_public", "--runs", "500", "--artifacts", str(tmp_path), "--logs", str(tmp_path)]
    assert main(args) == 0
