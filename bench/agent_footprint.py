"""The agent's footprint on its host: resident memory, CPU share at a 60 s interval, CPU time
per attestation, and time to detect a watched posture change.

A real verifier (SQLite, mTLS on loopback, the default policy) runs in this process; each
agent is a real ``devtrust-agent run`` process (``python -m devtrust.agent.main``) over its
own swtpm with an EK certificate, a simulated host tree (swtpm/hosttree.py) as its posture
root and the recorded 8x H100 ``nvidia-smi -q -x`` capture of the corpus as its GPU state.

With ``--baseline-rev REV`` a second agent runs beside it, made from the agent package as it
was at git revision REV (``git archive``, nothing in the repository changes) and the rest of
the working tree: both see the same verifier, the same machine noise and the same windows,
so each figure has its baseline measured in the same run.

Phases, all agents at once:

1. enrollment and the first attestation (verifier ``attestation.interval_s`` 60 s);
2. a quiet window of ``--window-s`` seconds: CPU share (``cpu_times`` delta over wall time)
   and resident memory (psutil RSS, the median of samples every 5 s);
3. posture flips, the agents taking turns, two kinds: PermitRootLogin in the host tree's
   sshd_config.d flips yes/no (a regular file: inotify where the agent uses it), timed from
   the write to the agent's "posture changed" log line (detection) and to the trust result
   that shows it (``ssh.root_login``); and a service listener (port 8080) comes and goes in
   the tree's proc/net/tcp (a pseudo file on a host: polled), timed to detection and to the
   first result after it. The agent's debounce and the verifier's posture_min_interval_s
   are 2 s, the flips 2.5-3 s apart, so each flip is a first change: detection, not
   coalescing, is measured;
4. the verifier restarts on the same ports with a 0.5 s interval; CPU time per attestation
   over 40 results (10 with --quick), less the idle share of phase 2 (gross also shown);
   resident memory again after them (``agent_rss_after_attestations_mb``: what the
   attestation path itself keeps resident).

Each agent runs with its own revision's defaults (``watch_interval_s`` among them).

    .venv/bin/python -m bench.agent_footprint [--quick] [--baseline-rev REV] [--json FILE]
        [--window-s SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.common import IN_REPO_CORPUS
from devtrust.swtpm import EndorsementCA, Swtpm, provision
from devtrust.swtpm.bootlog import header_only_log
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.verifier.config import (
    AttestationConfig,
    CaConfig,
    EndorsementConfig,
    ListenConfig,
    TlsConfig,
    VerifierConfig,
)
from devtrust.verifier.pki import PkiFiles, init_pki
from devtrust.verifier.server import RunningVerifier, start_verifier

REPO = Path(__file__).resolve().parent.parent
H100 = IN_REPO_CORPUS / "gpu/nvidia_k8s-test-infra/qx-h100.xml"
HARDENING = "etc/ssh/sshd_config.d/10-hardening.conf"
WINDOW_S = 2.0  # agent posture_debounce_s and verifier posture_min_interval_s
RESULT = "trust result: tier="
SERVICE_ROW = (  # 0.0.0.0:8080 LISTEN, as /proc/net/tcp writes it
    "   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
    "     0        0 23456 1 0000000000000000 100 0 0 10 0\n"
)
CHANGED = "posture changed: "


@dataclasses.dataclass(frozen=True)
class Plan:
    window_s: float
    flips: int
    attestations: int

    @classmethod
    def of(cls, quick: bool) -> Plan:
        return cls(30.0, 4, 10) if quick else cls(180.0, 15, 40)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def baseline_tree(rev: str, work: Path) -> Path:
    """A directory for PYTHONPATH whose ``devtrust`` package is the working tree's, but with
    ``devtrust.agent`` as it was at ``rev``. Python's path finder comes before the editable
    install's finder, so an agent started with it runs that revision's agent code."""
    top = work / "baseline-src"
    package = top / "devtrust"
    package.mkdir(parents=True)
    source = REPO / "protos" / "devtrust"
    for entry in source.iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in ("verifier", "swtpm"):
        (package / name).symlink_to(REPO / name)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "agent"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(top)], input=archive, check=True)
    (top / "agent").rename(package / "agent")
    return top


class AgentProcess:
    """One ``devtrust-agent run`` process; its log lines, each with the monotonic time this
    process read it (a thread reads them as they come)."""

    def __init__(self, name: str, config: Path, pythonpath: Path | None) -> None:
        self.name = name
        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devtrust.agent.main", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def since(self, t: float) -> list[tuple[float, str]]:
        with self._lock:
            return [(at, line) for at, line in self.lines if at >= t]

    def results(self) -> int:
        with self._lock:
            return sum(RESULT in line for _, line in self.lines)

    async def wait_line(
        self, after: float, match: Callable[[str], bool], timeout_s: float = 60.0
    ) -> float:
        """The time of the first line read at or after ``after`` that matches."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in self.since(after):
                if match(line):
                    return at
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.005)
        tail = "\n".join(line for _, line in self.lines[-20:])
        raise RuntimeError(f"{self.name}: no matching log line within {timeout_s} s:\n{tail}")

    async def wait_results(self, count: int, timeout_s: float = 120.0) -> None:
        await self.wait_line(0.0, lambda _: self.results() >= count, timeout_s)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        return float(self.ps.memory_info().rss) / 1e6

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def agent_yaml(path: Path, work: Path, pki: PkiFiles, ports: tuple[int, int], tcti: str) -> Path:
    """The agent's configuration, with keys every agent revision knows."""
    gpu_xml = work / "qx-h100.xml"
    shutil.copyfile(H100, gpu_xml)
    cfg = {
        "verifier": {
            "enrollment": f"127.0.0.1:{ports[0]}",
            "attestation": f"127.0.0.1:{ports[1]}",
            "ca_bundle": str(pki.ca_cert),
        },
        "tpm": {"tcti": tcti},
        "state_dir": str(work / "state"),
        "runtime_dir": str(work / "run"),
        "event_log": str(header_only_log(work / "event-log.bin")),
        "posture_root": str(write_host_tree(work / "host")),
        "gpu_source": "nvidia-smi-xml",
        "gpu_xml": str(gpu_xml),
        "posture_debounce_s": WINDOW_S,
        "rpc_timeout_s": 10.0,
        "reconnect_max_s": 1.0,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def verifier_config(
    work: Path, pki: PkiFiles, ek: EndorsementCA, ports: tuple[int, int], interval_s: float
) -> VerifierConfig:
    return VerifierConfig(
        database=work / "verifier.db",
        listen=ListenConfig(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"),
        tls=TlsConfig(pki.server_cert, pki.server_key),
        ca=CaConfig(pki.ca_cert, pki.ca_key),
        endorsement=EndorsementConfig(roots=[], trust_swtpm_local_ca=ek.cert_path),
        attestation=AttestationConfig(
            interval_s=interval_s,
            posture_min_interval_s=WINDOW_S,
            stream_challenge_gap_s=0.0,
        ),
    )


@dataclasses.dataclass
class Figures:
    rss_mb: list[float] = dataclasses.field(default_factory=list)
    rss_after_mb: list[float] = dataclasses.field(default_factory=list)
    cpu_share_pct: float = 0.0
    detect_s: list[float] = dataclasses.field(default_factory=list)
    to_result_s: list[float] = dataclasses.field(default_factory=list)
    polled_detect_s: list[float] = dataclasses.field(default_factory=list)
    polled_to_result_s: list[float] = dataclasses.field(default_factory=list)
    per_attestation_ms: float = 0.0
    per_attestation_gross_ms: float = 0.0


async def flip(root: Path, agent: AgentProcess, login: str, figures: Figures) -> None:
    """sshd_config (a regular file): PermitRootLogin flips; the result shows ssh.root_login."""
    (root / HARDENING).write_text(f"PermitRootLogin {login}\nPasswordAuthentication no\n")
    start = time.monotonic()
    detected = await agent.wait_line(start, lambda line: CHANGED in line and "sshd_config" in line)

    def shows(line: str) -> bool:
        return RESULT in line and ("ssh.root_login" in line) == (login == "yes")

    result = await agent.wait_line(start, shows)
    figures.detect_s.append(detected - start)
    figures.to_result_s.append(result - start)


async def flip_listener(root: Path, agent: AgentProcess, listen: bool, figures: Figures) -> None:
    """/proc/net/tcp (a pseudo file on a host: polled): a service listener on port 8080
    comes or goes; the first result after the agent saw it is the verifier's answer."""
    tcp = root / "proc/net/tcp"
    rows = [line for line in tcp.read_text().splitlines(keepends=True) if ":1F90 " not in line]
    if listen:
        rows.append(SERVICE_ROW)
    tcp.write_text("".join(rows))
    start = time.monotonic()
    detected = await agent.wait_line(
        start, lambda line: CHANGED in line and "listening_sockets" in line
    )
    result = await agent.wait_line(detected, lambda line: RESULT in line)
    figures.polled_detect_s.append(detected - start)
    figures.polled_to_result_s.append(result - start)


async def quiet_window(
    agents: dict[str, AgentProcess], figures: dict[str, Figures], window_s: float
) -> None:
    """CPU share over ``window_s`` and RSS samples every 5 s, all agents at once."""
    print(f"quiet window {window_s:.0f} s at a 60 s interval ...", file=sys.stderr)
    cpu0 = {name: a.cpu_s() for name, a in agents.items()}
    t0 = time.monotonic()
    while time.monotonic() - t0 < window_s:
        for name, a in agents.items():
            figures[name].rss_mb.append(a.rss_mb())
        await asyncio.sleep(min(5.0, window_s - (time.monotonic() - t0)) or 0.01)
    wall = time.monotonic() - t0
    for name, a in agents.items():
        figures[name].cpu_share_pct = 100 * (a.cpu_s() - cpu0[name]) / wall


async def measure(work: Path, plan: Plan, baseline_rev: str | None) -> dict[str, Figures]:
    now = datetime.datetime.now(datetime.UTC)
    pki = init_pki(work / "pki", hostnames=["127.0.0.1"], now=now)
    ek = EndorsementCA.create(work / "ek-ca")
    ports = (free_port(), free_port())
    variants: dict[str, Path | None] = {"agent": None}
    if baseline_rev is not None:
        variants[f"agent@{baseline_rev}"] = baseline_tree(baseline_rev, work)
    tpms: list[Swtpm] = []
    agents: dict[str, AgentProcess] = {}
    roots: dict[str, Path] = {}
    verifier: RunningVerifier | None = None
    try:
        verifier = await start_verifier(verifier_config(work, pki, ek, ports, 60.0))
        for n, (name, pythonpath) in enumerate(variants.items()):
            home = work / f"a{n}"
            provision(home / "tpm", ek)
            tpm = Swtpm(home / "tpm").start()
            tpms.append(tpm)
            config = agent_yaml(home / "agent.yaml", home, pki, ports, tpm.tcti)
            roots[name] = home / "host"
            agents[name] = AgentProcess(name, config, pythonpath)
        figures = {name: Figures() for name in agents}
        print(f"enrolling {len(agents)} agent(s) ...", file=sys.stderr)
        await asyncio.gather(*(a.wait_results(1) for a in agents.values()))
        await asyncio.sleep(5.0)

        await quiet_window(agents, figures, plan.window_s)

        print(f"{plan.flips} posture flips per agent ...", file=sys.stderr)
        for n in range(plan.flips):
            login = "yes" if n % 2 == 0 else "no"
            for name, a in agents.items():
                await flip(roots[name], a, login, figures[name])
                await asyncio.sleep(WINDOW_S + 0.5 + random.uniform(0, 0.5))  # noqa: S311
                await flip_listener(roots[name], a, n % 2 == 0, figures[name])
                await asyncio.sleep(WINDOW_S + 0.5 + random.uniform(0, 0.5))  # noqa: S311

        print(f"{plan.attestations} attestations at a 0.5 s interval ...", file=sys.stderr)
        await verifier.stop(grace=None)
        verifier = None
        verifier = await start_verifier(verifier_config(work, pki, ek, ports, 0.5))
        counts = {name: a.results() + 3 for name, a in agents.items()}
        await asyncio.gather(*(a.wait_results(counts[name]) for name, a in agents.items()))
        cpu0 = {name: a.cpu_s() for name, a in agents.items()}
        start = {name: time.monotonic() for name in agents}
        done: dict[str, tuple[float, float]] = {}

        async def run(name: str, a: AgentProcess) -> None:
            await a.wait_results(counts[name] + plan.attestations, timeout_s=600.0)
            done[name] = (time.monotonic() - start[name], a.cpu_s() - cpu0[name])

        await asyncio.gather(*(run(name, a) for name, a in agents.items()))
        for name, (spent_wall, spent_cpu) in done.items():
            f = figures[name]
            f.per_attestation_gross_ms = 1000 * spent_cpu / plan.attestations
            idle = f.cpu_share_pct / 100 * spent_wall
            f.per_attestation_ms = 1000 * (spent_cpu - idle) / plan.attestations
        for _ in range(3):
            for name, a in agents.items():
                figures[name].rss_after_mb.append(a.rss_mb())
            await asyncio.sleep(1.0)
        return figures
    finally:
        for a in agents.values():
            a.stop()
        if verifier is not None:
            await verifier.stop(grace=None)
        for tpm in tpms:
            tpm.stop()


def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile (the maximum below 100 samples)."""
    ordered = sorted(samples)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def rows(figures: Figures) -> list[tuple[str, float, str]]:
    return [
        ("agent_rss_mb", statistics.median(figures.rss_mb), "MB"),
        ("agent_rss_after_attestations_mb", statistics.median(figures.rss_after_mb), "MB"),
        ("agent_cpu_share_60s_interval", figures.cpu_share_pct, "% of one core"),
        ("agent_cpu_per_attestation", figures.per_attestation_ms, "ms"),
        ("agent_cpu_per_attestation_gross", figures.per_attestation_gross_ms, "ms"),
        ("agent_posture_detect_p50", statistics.median(figures.detect_s), "s"),
        ("agent_posture_detect_p99", p99(figures.detect_s), "s"),
        ("agent_posture_to_result_p50", statistics.median(figures.to_result_s), "s"),
        ("agent_posture_to_result_p99", p99(figures.to_result_s), "s"),
        ("agent_posture_detect_polled_p50", statistics.median(figures.polled_detect_s), "s"),
        ("agent_posture_detect_polled_p99", p99(figures.polled_detect_s), "s"),
        ("agent_posture_to_result_polled_p50", statistics.median(figures.polled_to_result_s), "s"),
        ("agent_posture_to_result_polled_p99", p99(figures.polled_to_result_s), "s"),
    ]


def report(figures: dict[str, Figures]) -> list[dict[str, Any]]:
    names = list(figures)
    current = rows(figures[names[0]])
    base = rows(figures[names[1]]) if len(names) > 1 else None
    out: list[dict[str, Any]] = []
    head = f"{'figure':36s} {'unit':14s} {names[0]:>12s}"
    if base is not None:
        head += f" {names[1]:>18s} {'ratio':>7s}"
    print(head)
    for n, (name, value, unit) in enumerate(current):
        line = f"{name:36s} {unit:14s} {value:12.3f}"
        entry: dict[str, Any] = {"name": name, "value": round(value, 4), "unit": unit}
        if base is not None:
            b = base[n][1]
            line += f" {b:18.3f} {value / b if b else float('nan'):7.2f}"
            entry.update(baseline_name=f"{name} ({names[1]})", baseline_value=round(b, 4))
        print(line)
        out.append(entry)
    samples = len(figures[names[0]].detect_s)
    print(
        f"({samples} flips of each kind per agent: sshd_config (inotify), a listener "
        "(/proc/net/tcp, polled); p99 is nearest-rank: the maximum below 100)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 2 minutes)")
    parser.add_argument(
        "--baseline-rev",
        metavar="REV",
        help="also run the agent package as at this git revision, side by side",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    parser.add_argument("--window-s", type=float, help="the quiet window's length (seconds)")
    args = parser.parse_args()
    if args.baseline_rev is not None:
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", f"{args.baseline_rev}^{{commit}}"],
            check=True,
            capture_output=True,
        )
    with tempfile.TemporaryDirectory(prefix="agent-footprint-") as tmp:
        plan = Plan.of(args.quick)
        if args.window_s is not None:
            plan = dataclasses.replace(plan, window_s=args.window_s)
        figures = asyncio.run(measure(Path(tmp), plan, args.baseline_rev))
    out = report(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
