"""Verifier CPU per complete attestation, against a bare grpc.aio mTLS echo in the same run.

Two servers, each in its own process, driven by the same client load from this process:

- the real verifier, ``devtrust-verifier serve`` on an SQLite file with the default policy,
  ``attestation.interval_s: 0`` (the next challenge travels with each Result: devices attest
  back to back) and ``stream_challenge_gap_s: 0``;
- bench/echo.py, a bare grpc.aio bidirectional-streaming echo over mTLS with the same
  certificates, answering each message with as many bytes as the verifier's replies had.

M devices (``--devices``), each on its own mTLS connection and stream, each a real TPM
(one swtpm process per device, enrolled with the verifier through the agent's own enrollment;
``--tpm soft`` uses the in-process ``devtrust.swtpm.soft.SoftTpm`` once it exists). Each
round a device quotes the verifier's nonce over the evidence body and sends the Evidence:
8x H100 GPU state (the agent's nvidia-smi parser over the recorded capture
tests/data/corpus/gpu/nvidia_k8s-test-infra/qx-h100.xml), the OS posture of the simulated host
tree (swtpm/hosttree.py), collected_at set anew, and a key to certify in 1% of rounds (and
on the first of each stream). For the echo, the client makes the same Evidence (its own
nonce, the same quote) and counts the echoed replies.

Two cases: ``unchanged`` (the same posture every round: the steady state) and ``changed``
(``os.pending_security_updates`` counts up every round: every appraisal is the first after a
posture change, so the policy is evaluated every time).

Each leg runs ``--warmup-s``, then a window of ``--window-s``: the server's CPU time (user +
system of its process and its children, the policy workers, by psutil) over the window,
divided by the Results (echo replies) the clients received in it. Reported: the median over
``--runs`` of CPU per attestation (us), per echo round trip, their ratio (the median of the
per-run ratios), and attestations per second per verifier core (1e6 / CPU per attestation).
The client's own speed limits the rate, not the CPU per attestation.

    .venv/bin/python -m bench.verifier_cpu [--devices 8] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import psutil

from bench.attest_load import (
    CASES,
    Bodies,
    Counter,
    Device,
    Tpms,
    attest_loop,
    echo_loop,
    make_devices,
)
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.verifier.pki import PkiFiles, init_pki


@dataclass(frozen=True)
class Leg:
    cpu_us: float  # server CPU per attestation (per echo round trip)
    rate: float  # attestations (round trips) per second seen by the clients
    count: int


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU of a process and its live children (the policy workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def thread_times(proc: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def print_threads(
    proc: psutil.Process, before: dict[int, float], after: dict[int, float], count: int
) -> None:
    """The server's CPU per attestation by thread (names from /proc), largest first."""
    rows = []
    for tid, total in after.items():
        spent = total - before.get(tid, 0.0)
        if spent > 0:
            try:
                name = Path(f"/proc/{proc.pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                name = "?"
            rows.append((spent, tid, name))
    for spent, tid, name in sorted(rows, reverse=True)[:12]:
        main = " (event loop)" if tid == proc.pid else ""
        print(f"  thread {tid} {name}{main}: {spent / count * 1e6:.0f} us", file=sys.stderr)


Loop = Callable[..., Any]


async def leg(
    loop_fn: Loop,
    devices: list[Device],
    target: str,
    bodies: Bodies,
    server: psutil.Process,
    *,
    changed: bool,
    warmup_s: float,
    window_s: float,
    profile: Path | None = None,
    show_threads: bool = False,
) -> tuple[Leg, Counter]:
    counter = Counter()

    async def run(dev: Device) -> None:
        try:
            await loop_fn(dev, target, bodies, counter, changed=changed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            counter.errors.append(f"{dev.name}: {type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(run(d)) for d in devices]
    spy = None
    try:
        await asyncio.sleep(warmup_s)
        if profile is not None:  # py-spy samples the server through the window
            spy = subprocess.Popen(  # noqa: ASYNC220 - started once, before the window
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "-p",
                    str(server.pid),
                    "-d",
                    str(int(window_s)),
                    "-r",
                    "200",
                    "-s",
                    "-f",
                    "raw",
                    "-o",
                    str(profile),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        threads0 = thread_times(server) if show_threads else {}
        cpu0, n0, t0 = cpu_seconds(server), counter.results, time.monotonic()
        await asyncio.sleep(window_s)
        cpu1, n1, t1 = cpu_seconds(server), counter.results, time.monotonic()
        if show_threads:
            print_threads(server, threads0, thread_times(server), n1 - n0)
        if spy is not None:
            await asyncio.to_thread(spy.wait)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if counter.errors:
        raise RuntimeError("; ".join(counter.errors[:3]))
    count = n1 - n0
    if count <= 0:
        raise RuntimeError("no results in the window")
    return Leg(cpu_us=(cpu1 - cpu0) / count * 1e6, rate=count / (t1 - t0), count=count), counter


# --- the servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it served")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing served on port {port} within {timeout}s")


def verifier_config(work: Path, pki: PkiFiles, trusted: dict[str, str]) -> tuple[Path, int, int]:
    enroll_port, attest_port = free_port(), free_port()
    config = {
        "database": str(work / "verifier.db"),
        "listen": {
            "enrollment": f"127.0.0.1:{enroll_port}",
            "attestation": f"127.0.0.1:{attest_port}",
        },
        "tls": {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key)},
        "ca": {"cert": str(pki.ca_cert), "key": str(pki.ca_key)},
        "endorsement": trusted,
        # Back to back: the next challenge travels with each Result.
        "attestation": {"interval_s": 0, "stream_challenge_gap_s": 0},
    }
    path = work / "verifier.yaml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    return path, enroll_port, attest_port


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Any:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Figures:
    verifier: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CASES})
    rate: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CASES})
    echo: list[float] = field(default_factory=list)
    echo_rate: list[float] = field(default_factory=list)
    ratio: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CASES})


async def measure(args: argparse.Namespace, work: Path) -> Figures:
    now = datetime.datetime.now(datetime.UTC)
    pki = init_pki(work / "pki", hostnames=["127.0.0.1", "localhost"], now=now)
    write_host_tree(work / "host")
    bodies = Bodies(work / "host")
    stack = contextlib.ExitStack()
    tpms = Tpms(args.tpm, work, stack)
    config, enroll_port, attest_port = verifier_config(work, pki, tpms.trusted)
    verifier_cmd = [
        sys.executable,
        "-m",
        "devtrust.verifier.main",
        "serve",
        "--config",
        str(config),
    ]
    figures = Figures()
    with stack:
        vproc = stack.enter_context(process(verifier_cmd, work / "verifier.log"))
        wait_port(attest_port, vproc)
        devices = await make_devices(work, pki, tpms, args.devices, enroll_port, attest_port)
        vserver = psutil.Process(vproc.pid)
        echo: psutil.Process | None = None
        echo_port = 0
        target = f"127.0.0.1:{attest_port}"
        # Priming, not measured: the policy workers start on the first evaluation (a
        # second of CPU each, importing), and every stream's first round asks for the log.
        await leg(
            attest_loop,
            devices,
            target,
            bodies,
            vserver,
            changed=True,
            warmup_s=args.warmup_s,
            window_s=1.0,
        )
        for run in range(args.runs):
            per_case: dict[str, Leg] = {}
            for case in CASES:
                result, counter = await leg(
                    attest_loop,
                    devices,
                    target,
                    bodies,
                    vserver,
                    changed=case == "changed",
                    warmup_s=args.warmup_s,
                    window_s=args.window_s,
                    profile=(
                        Path(f"{args.profile}-{case}.txt") if args.profile and run == 0 else None
                    ),
                    show_threads=args.threads and run == 0,
                )
                per_case[case] = result
                if echo is None:  # the echo answers with as many bytes as the verifier
                    reply = counter.reply_bytes // max(1, counter.results)
                    echo_port = free_port()
                    eproc = stack.enter_context(
                        process(
                            [
                                sys.executable,
                                "-m",
                                "bench.echo",
                                "--cert",
                                str(pki.server_cert),
                                "--key",
                                str(pki.server_key),
                                "--ca",
                                str(pki.ca_cert),
                                "--reply-bytes",
                                str(reply),
                                "--port",
                                str(echo_port),
                            ],
                            work / "echo.log",
                        )
                    )
                    wait_port(echo_port, eproc)
                    echo = psutil.Process(eproc.pid)
            assert echo is not None
            base, _ = await leg(
                echo_loop,
                devices,
                f"127.0.0.1:{echo_port}",
                bodies,
                echo,
                changed=False,
                warmup_s=args.warmup_s,
                window_s=args.window_s,
            )
            figures.echo.append(base.cpu_us)
            figures.echo_rate.append(base.rate)
            line = f"run {run + 1}: echo {base.cpu_us:.0f} us ({base.rate:.0f}/s)"
            for case, result in per_case.items():
                figures.verifier[case].append(result.cpu_us)
                figures.rate[case].append(result.rate)
                figures.ratio[case].append(result.cpu_us / base.cpu_us)
                line += (
                    f"; {case} {result.cpu_us:.0f} us ({result.rate:.0f}/s, "
                    f"{result.cpu_us / base.cpu_us:.2f}x)"
                )
            print(line, file=sys.stderr, flush=True)
    return figures


GOALS = {"unchanged": 2.5, "changed": 4.0}
LABELS = {
    "unchanged": "posture unchanged",
    "changed": "first appraisal after a posture change",
}


def report(figures: Figures, devices: int, tpm: str) -> list[dict[str, Any]]:
    med = statistics.median
    echo = med(figures.echo)
    out: list[dict[str, Any]] = []
    rows = [
        ("bare grpc.aio mTLS echo, one round trip", echo, 1.0, 1e6 / echo, med(figures.echo_rate))
    ]
    for case in CASES:
        cpu = med(figures.verifier[case])
        ratio = med(figures.ratio[case])
        rows.append(
            (f"verifier, 8x H100, {LABELS[case]}", cpu, ratio, 1e6 / cpu, med(figures.rate[case]))
        )
        what = f"verifier CPU per attestation, 8x H100 evidence, default policy, {LABELS[case]}"
        out += [
            {
                "name": what,
                "value": round(cpu, 1),
                "unit": "us",
                "baseline_name": "bare grpc.aio mTLS echo, CPU per round trip",
                "baseline_value": round(echo, 1),
            },
            {
                "name": f"{what}, ratio to the echo",
                "value": round(ratio, 2),
                "unit": "x",
                "baseline_name": "goal (issue 11)",
                "baseline_value": GOALS[case],
            },
            {
                "name": f"attestations per second per verifier core, {LABELS[case]}",
                "value": round(1e6 / cpu),
                "unit": "1/s",
                "baseline_name": "echo round trips per second per core",
                "baseline_value": round(1e6 / echo),
            },
        ]
    runs = len(figures.echo)
    print(
        f"\nverifier CPU per complete attestation ({devices} devices, {tpm} TPMs, median of "
        f"{runs} runs)\n"
    )
    print(f"| {'what':<62} | {'CPU us':>7} | {'ratio':>6} | {'per core /s':>11} | {'seen /s':>7} |")
    print(f"|{'-' * 64}|{'-' * 9}|{'-' * 8}|{'-' * 13}|{'-' * 9}|")
    for name, cpu, ratio, per_core, seen in rows:
        print(f"| {name:<62} | {cpu:>7.0f} | {ratio:>5.2f}x | {per_core:>11.0f} | {seen:>7.0f} |")
    return out


def soft_available() -> bool:
    try:
        import devtrust.swtpm.soft  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="devices (swtpm processes)")
    parser.add_argument(
        "--tpm",
        choices=["soft", "swtpm"],
        default="soft" if soft_available() else "swtpm",
        help="the devices' TPMs: in-process software TPMs (default where devtrust.swtpm.soft "
        "exists) or one swtpm process each",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="before each window")
    parser.add_argument("--window-s", type=float, default=8.0, help="each measured window")
    parser.add_argument("--json", type=Path, help="write the figures here (a JSON list)")
    parser.add_argument(
        "--profile",
        help="py-spy the verifier in the first run's windows: PREFIX-CASE.txt (collapsed stacks)",
    )
    parser.add_argument(
        "--threads", action="store_true", help="the server's CPU by thread, first run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="devtrust-bench-"))
    try:
        figures = asyncio.run(measure(args, work))
    finally:
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    out = report(figures, args.devices, args.tpm)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
