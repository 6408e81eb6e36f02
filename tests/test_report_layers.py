"""`devtrust report` is an operator command: it does its real work with tpm2_pytss, pynvml,
the agent and swtpm unimportable (the guard of tests/test_layers_commands.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.db import make_database
from tests.test_layers_commands import PROGRAMS, guarded_run


def test_report_runs_without_tpm_or_gpu_libraries(tmp_path: Path) -> None:
    make_database(tmp_path / "v.db")
    page = tmp_path / "r.html"
    argv = ["report", "--database", str(tmp_path / "v.db"), "--json", "-", "--html", str(page)]
    run = guarded_run(PROGRAMS["devtrust"], argv, tmp_path)
    assert "BLOCKED IMPORT" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["version"] == 3
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
