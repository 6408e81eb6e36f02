"""``make bench``: every benchmark, one results file and one table.

Runs each benchmark in a process of its own (so none inherits another's imports, threads or
warmed caches), collects the figures each writes with ``--json``, and writes
``bench/results.json`` (one object per figure: name, value, unit, and the baseline measured
beside it in the same run) and ``BENCHMARKS.md`` (the same as a table, with the commands).
Each figure is a median over repeated runs inside its benchmark; the machine it ran on and
when are recorded with it.

    python -m bench.all                      # everything, fleets of 1,000 and 10,000
    python -m bench.all --fleet 1000 --quick  # shorter runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The last commit before issue 11's lighter agent: the agent footprint's baseline.
AGENT_BASELINE = "9e5666c"


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    source: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value


def _run(source: str, argv: list[str], out: Path, timeout: float) -> list[Figure]:
    """Run one benchmark with ``--json out``; its figures, each tagged with ``source``."""
    print(f"== {source}: {' '.join(argv)}", file=sys.stderr, flush=True)
    run = subprocess.run(
        [*argv, "--json", str(out)], cwd=ROOT, timeout=timeout, check=False, text=True
    )
    if run.returncode != 0 or not out.exists():
        print(f"!! {source} failed ({run.returncode}); its figures are missing", file=sys.stderr)
        return [Figure(f"{source} failed", float(run.returncode), "exit status", source=source)]
    doc = json.loads(out.read_text())
    items = doc if isinstance(doc, list) else doc.get("figures", [])
    return [
        Figure(
            name=str(item["name"]),
            value=float(item["value"]),
            unit=str(item.get("unit", "")),
            baseline_name=str(item.get("baseline_name") or ""),
            baseline_value=(
                float(item["baseline_value"]) if item.get("baseline_value") is not None else None
            ),
            source=source,
            note=str(item.get("note", "")),
        )
        for item in items
    ]


def fleet_figures(devices: int, doc: dict[str, Any]) -> list[Figure]:
    """What a ``devtrust simulate --json`` run contributes."""
    src = f"fleet {devices}"
    name = f"fleet {devices:,}:"
    enroll_rate = doc["enrolled"] / max(doc["enroll_seconds"], 1e-9)
    out = [
        Figure(f"{name} attestations per second", doc["attestations_per_s"], "1/s", source=src),
        Figure(
            f"{name} latency p50, quote to result", doc["latency_p50_s"] * 1e3, "ms", source=src
        ),
        Figure(
            f"{name} latency p99, quote to result", doc["latency_p99_s"] * 1e3, "ms", source=src
        ),
        Figure(f"{name} enrollments per second", enroll_rate, "1/s", source=src),
        Figure(f"{name} lost results", doc["lost_results"] or 0, "results", source=src),
        Figure(f"{name} duplicated results", doc["duplicated_results"] or 0, "results", source=src),
    ]
    for kind, k in doc["fault_kinds"].items():
        serving = k.get("time_to_detect_p99_s_while_serving")
        if serving is not None:
            out.append(
                Figure(
                    f"{name} time to detect {kind}, p99, faults injected while the verifier served",
                    serving,
                    "s",
                    baseline_name="attestation interval",
                    baseline_value=doc["interval_s"],
                    source=src,
                    note=f"{k['detected_while_serving']} faults",
                )
            )
        if k["time_to_detect_p99_s"] is not None:
            out.append(
                Figure(
                    f"fleet {devices:,}: time to detect {kind}, p99",
                    k["time_to_detect_p99_s"],
                    "s",
                    baseline_name="attestation interval",
                    baseline_value=doc["interval_s"],
                    source=src,
                    note=f"{k['detected']}/{k['injected']} detected",
                )
            )
    return out


def _fleet(devices: int, duration: float, out: Path, timeout: float) -> list[Figure]:
    argv = [
        sys.executable, "-m", "devtrust.cli", "simulate", "--quiet", "--devices", str(devices),
        "--duration", str(duration), "--interval", "30", "--faults", "1%", "--seed", "1",
    ]  # fmt: skip
    print(f"== fleet {devices}: {' '.join(argv[2:])}", file=sys.stderr, flush=True)
    run = subprocess.run([*argv, "--json", str(out)], cwd=ROOT, timeout=timeout, check=False)
    if not out.exists():
        return [Figure(f"fleet {devices} failed", float(run.returncode), "exit status")]
    figures = fleet_figures(devices, json.loads(out.read_text()))
    if run.returncode != 0:
        # Its figures stand, and the run says it missed a fault or lost a result.
        figures.append(Figure(f"fleet {devices} failed", float(run.returncode), "exit status"))
    return figures


def render(figures: list[Figure], meta: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Made by `make bench` (`python -m bench.all {meta['args']}`) on {meta['when']}, "
        f"{meta['machine']}. Every value is a median over repeated runs within its benchmark; "
        "a ratio is against the baseline measured beside it in the same run, on the same "
        "(shared, noisy) machine. The same figures are in bench/results.json.",
        "",
        "| figure | value | baseline (same run) | ratio | from |",
        "|---|---|---|---|---|",
    ]
    for f in figures:
        base = (
            f"{f.baseline_name}: {_num(f.baseline_value)} {f.unit}".strip()
            if f.baseline_value is not None
            else "-"
        )
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
        note = f" ({f.note})" if f.note else ""
        lines.append(
            f"| {f.name}{note} | {_num(f.value)} {f.unit} | {base} | {ratio} | {f.source} |"
        )
    lines.append("")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.all")
    parser.add_argument("--fleet", type=int, nargs="*", default=[1000, 10000], help="fleet sizes")
    parser.add_argument("--fleet-duration", type=float, default=120.0)
    parser.add_argument(
        "--fleet-results",
        type=Path,
        nargs="*",
        default=[],
        help="figures of fleet runs made apart (devtrust simulate --json FILE), taken as they are",
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs (less precise)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--table", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    py = sys.executable
    quick = ["--quick"] if args.quick else []
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="devtrust-bench-") as tmp:
        t = Path(tmp)
        verifier = [py, "-m", "bench.verifier_cpu"]  # 3 runs, medians, even with --quick
        figures += _run("verifier_cpu", verifier, t / "v.json", 1800)
        figures += _run("appraisal", [py, "-m", "bench.appraisal"], t / "a.json", 900)
        figures += _run("gpu_verify", [py, "-m", "bench.gpu_verify"], t / "gpu.json", 900)
        # The agent beside the agent before issue 11 (the baseline of the same run).
        agent = [py, "-m", "bench.agent_footprint", "--baseline-rev", AGENT_BASELINE, *quick]
        figures += _run("agent_footprint", agent, t / "g.json", 1800)
        for devices in args.fleet:
            duration = 30.0 if args.quick else args.fleet_duration
            figures += _fleet(devices, duration, t / f"f{devices}.json", 3600)
        for path in args.fleet_results:
            doc = json.loads(path.read_text())
            figures += fleet_figures(doc["devices"], doc)
    meta = {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
    }
    # One object per figure, each saying when and where it was measured.
    rows = [{**asdict(f), "measured": meta["when"], "machine": meta["machine"]} for f in figures]
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    args.table.write_text(render(figures, meta))
    print(render(figures, meta))
    failed = [f.name for f in figures if f.name.endswith(" failed")]
    if failed:
        print(f"bench: {', '.join(failed)}: see the output above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
