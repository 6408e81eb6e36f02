"""`devtrust simulate` scrapes the embedded verifier's Prometheus endpoint while a small fleet
attests and at the end, and its metrics match the store (issue 13, "what it must show"):
devices by zone, state and tier, appraisals (per tier), certificates issued and revoked,
enrollments, open streams before the devices stop; a device fault is detected and timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DEVTRUST = [sys.executable, "-m", "devtrust.cli"]


def test_a_small_fleets_metrics_match_the_store(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [
            *DEVTRUST, "simulate", "--quiet", "--devices", "12", "--duration", "12",
            "--interval", "2", "--faults", "10%:pcr,driver", "--seed", "3",
            "--json", str(out), "--work", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    metrics = doc["metrics"]
    assert metrics["mismatches"] == []
    assert metrics["counters_compared_with_store"] is True
    assert set(metrics["checked"]) == {
        "every metric served by verifier 0",
        "open streams before the devices stopped",
        "devices by zone, state and tier",
        "appraisals",
        "appraisals by tier",
        "certificates issued",
        "certificates revoked",
        "enrollments (enrolled, pending approval)",
    }
    # Every device attached had its stream open before the devices stopped.
    assert metrics["open_streams_before_stop"] == metrics["devices_attached_before_stop"] == 12
    assert metrics["appraisals"] == doc["stored_decisions"]
    assert metrics["enrollments"]["enrolled"] == 12
    assert sum(metrics["devices_by_zone_state_tier"].values()) == 12
    # The faults were seen: findings counted, their certificates revoked.
    assert metrics["findings"], metrics
    assert metrics["certificates_revoked"] >= 1
    assert metrics["certificates_issued"] >= 12 + 12  # a channel and a device certificate each
    assert metrics["appraisal_latency_p50_s"] is not None
    # A fault the agent noted changed its device's verdict: detected and timed (review L12).
    assert metrics["detections"] > 0, metrics
    assert metrics["detection_mean_s"] is not None
    assert metrics["scrapes"] >= 3
    assert "metrics      " in run.stdout
    assert "match the store" in run.stdout
