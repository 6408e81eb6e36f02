"""`devtrust simulate` for real: a small fleet (soft TPMs and one swtpm) against the embedded
verifier, every fault kind injected and detected, nothing lost; and its usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from devtrust.swtpm.sim_faults import Figures
from devtrust.swtpm.sim_verifier import StoreCheck
from devtrust.swtpm.simulate import _check_store, succeeded

DEVTRUST = [sys.executable, "-m", "devtrust.cli"]


def simulate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEVTRUST, "simulate", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_fleet_with_every_fault_kind(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = simulate(
        "--devices", "30", "--swtpm", "1", "--duration", "24", "--interval", "4",
        "--faults", "4%", "--seed", "11", "--json", str(out), "--work", str(tmp_path / "work"),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["enrolled"] == 30
    assert doc["swtpms"] == 1
    assert sum(doc["tiers"].values()) == 30
    kinds = doc["fault_kinds"]
    assert set(kinds) == {"pcr", "driver", "ecc", "replay", "clock", "storm", "restart"}
    for name, kind in kinds.items():
        assert kind["injected"] >= 1, name
        assert kind["detected"] == kind["injected"], (name, kind)
    for name in ("pcr", "driver", "ecc", "replay", "clock"):
        assert kinds[name]["recovered"] == kinds[name]["detected"], (name, kinds[name])
        # Those injected between the restart and the fleet's recovery are counted apart.
        assert kinds[name]["detected_while_serving"] <= kinds[name]["detected"]
    assert doc["lost_results"] == 0
    assert doc["duplicated_results"] == 0
    assert doc["stored_decisions"] >= doc["results"] > 30
    assert doc["errors"] == {}
    # The table says the same.
    assert "lost 0, duplicated 0" in run.stdout
    assert "restart" in run.stdout


def test_without_faults_every_device_attests(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = simulate(
        "--devices", "12", "--duration", "10", "--interval", "2", "--json", str(out),
        "--work", str(tmp_path / "work"),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["enrolled"] == 12
    assert doc["devices_without_a_result"] == 0
    assert doc["results"] >= 12 * 2  # a first result and at least one at the interval
    # The recorded hosts: the A100's fabric is unknown to policy (warning), the rest pass.
    assert doc["tiers"] == {"affirming": 9, "warning": 3}
    assert doc["fault_kinds"] == {}
    assert doc["lost_results"] == 0
    assert doc["duplicated_results"] == 0


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--faults", "1"], 2, "needs a % sign"),
        (["--faults", "1%:bios"], 2, "'bios' is not a fault kind"),
        (["--devices", "0"], 2, "must be at least 1"),
        (["--duration", "-3"], 2, "must be more than 0 seconds"),
        (["--devices", "2", "--swtpm", "3"], 2, "--swtpm 3 is more than --devices 2"),
        (["--verifier", "127.0.0.1:1"], 2, "--verifier, --enrollment and --ca-bundle together"),
        (["--json", "/nonexistent/dir/x.json"], 2, "--json /nonexistent/dir/x.json: no directory"),
        (["--replicas", "0"], 2, "argument --replicas: 0 must be at least 1"),
        (["--reconnect-max", "0"], 2, "--reconnect-max: 0 must be more than 0 seconds"),
        (["--database", "/tmp/x.db"], 2, "'/tmp/x.db' is not a PostgreSQL URL"),
        (["--database", "mysql://u:p@h:1/d"], 2, "is not a PostgreSQL URL"),
        (["--replicas", "2"], 2, "--replicas 2 needs a database the replicas share"),
        (
            ["--postgres", "--database", "postgresql://u:p@127.0.0.1:1/d"],
            2,
            "argument --database: not allowed with argument --postgres",
        ),
        (
            [
                "--verifier",
                "127.0.0.1:1",
                "--enrollment",
                "127.0.0.1:2",
                "--ca-bundle",
                "x",
                "--simulation-root",
                "r",
                "--postgres",
            ],
            2,
            "--replicas, --database and --postgres are for the embedded verifiers",
        ),
    ],
)
def test_usage_errors_say_what_to_do(args: list[str], status: int, says: str) -> None:
    run = simulate(*args, timeout=60)
    assert run.returncode == status, run.stdout + run.stderr
    assert says in run.stderr
    assert "Traceback" not in run.stderr


def _device(results: int, quotes: int, device_id: str) -> SimpleNamespace:
    return SimpleNamespace(
        name=device_id,
        results=results,
        tpm=SimpleNamespace(quotes=quotes),
        enrollment=SimpleNamespace(device_id=device_id),
    )


@pytest.mark.parametrize(
    ("results", "quotes", "stored", "store_duplicates", "lost", "duplicated"),
    [
        (5, 6, 6, 0, 0, 0),  # the last evidence's result never arrived: not lost
        (5, 5, 4, 0, 1, 0),  # a result the device got is not in the store: lost
        (5, 5, 7, 0, 0, 2),  # more decisions than evidence: duplicated
        (5, 5, 5, 1, 0, 1),  # one evidence stored twice
    ],
)
def test_the_store_check_finds_lost_and_duplicated_results(
    results: int, quotes: int, stored: int, store_duplicates: int, lost: int, duplicated: int
) -> None:
    fleet = SimpleNamespace(devices=[_device(results, quotes, "a"), _device(2, 2, "b")])
    check = StoreCheck({"a": stored, "b": 2}, store_duplicates)
    figures = Figures(devices=2, enrolled=2)
    _check_store(fleet, check, figures)  # type: ignore[arg-type]
    assert (figures.lost, figures.duplicated) == (lost, duplicated)
    assert succeeded(figures) == (lost == duplicated == 0)
