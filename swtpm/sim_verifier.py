"""The simulator's embedded verifier: a real ``devtrust-verifier serve`` process.

``devtrust simulate`` without ``--verifier`` makes a CA and server certificate, a
configuration that trusts the simulation EK root (and, for swtpm devices, this run's swtpm
endorsement CA), and runs the verifier as a process of its own, so that the verifier and the
simulated fleet each have a core: in one process they would share one interpreter lock. Its
store is an SQLite file of its own, or a database URL that several of them share (replicas,
``devtrust.swtpm.sim_replicas``, with the CA and server certificate shared too). A verifier
is stopped (SIGTERM: it drains), killed or restarted for the faults, and the store is read
at the end (``read_store``, through the verifier's own storage code, either backend) to
check that nothing the agents were told was lost or stored twice.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devtrust.core.errors import DevtrustError
from devtrust.swtpm.sim_metrics import REFRESH_S
from devtrust.verifier.pki import PkiFiles, init_pki
from devtrust.verifier.storage.backends import open_repositories
from devtrust.verifier.storage.repositories import SqlRepositories
from devtrust.verifier.storage.sql import Connection

START_TIMEOUT_S = 60.0
# The verifier's drain bound (server.drain_s, its default) and the time it may take to exit
# after it: a stop that takes longer overran (counted; the devices had moved already).
DRAIN_S = 10.0
EXIT_MARGIN_S = 2.0


def make_pki(directory: Path) -> PkiFiles:
    """The verifier's CA and server certificate (for 127.0.0.1), shared by every replica."""
    return init_pki(
        directory,
        hostnames=["localhost", "127.0.0.1"],
        now=datetime.datetime.now(datetime.UTC),
        force=True,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class StoreCheck:
    """What the verifier's store holds of the run: decisions per device, and evidence
    digests stored more than once."""

    decisions: dict[str, int]
    duplicated: int


class EmbeddedVerifier:
    """A verifier process for one simulation run, its files in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        simulation_root: Path,
        swtpm_ca: Path | None,
        interval_s: float,
        workers: int = 1,
        extra: dict[str, Any] | None = None,
        database: str | None = None,
        pki: PkiFiles | None = None,
        name: str = "",
    ) -> None:
        self.directory = directory
        # An SQLite file of its own, or the URL of the database the replicas share.
        self.database: Path | str = database or directory / "verifier.db"
        self.name = name
        self.enrollment_port = free_port()
        self.attestation_port = free_port()
        # Its Prometheus endpoint, scraped by the run (devtrust.swtpm.sim_metrics).
        self.metrics_port = free_port()
        self.workers = workers
        directory.mkdir(parents=True, exist_ok=True)
        self.pki: PkiFiles = pki or make_pki(directory / "pki")
        endorsement: dict[str, Any] = {"trust_simulation_root": str(simulation_root)}
        if swtpm_ca is not None:
            endorsement["trust_swtpm_local_ca"] = str(swtpm_ca)
        config: dict[str, Any] = {
            "database": str(self.database),
            "listen": {
                "enrollment": f"127.0.0.1:{self.enrollment_port}",
                "attestation": f"127.0.0.1:{self.attestation_port}",
            },
            "tls": {
                "server_cert": str(self.pki.server_cert),
                "server_key": str(self.pki.server_key),
            },
            "ca": {"cert": str(self.pki.ca_cert), "key": str(self.pki.ca_key)},
            "endorsement": endorsement,
            # One simulator process hosts every agent: after a restart or a storm thousands
            # reconnect at once and each answers when that one core gets to it, later than
            # a host of its own would (10 s for Hello by default).
            "attestation": {
                "interval_s": interval_s,
                "hello_timeout_s": 60.0,
                "evidence_timeout_s": 60.0,
            },
            # A whole fleet enrolls from this one address, at once.
            "enrollment": {"rate_per_minute": 1e9, "burst": 1_000_000, "max_pending": 1_000_000},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}", "refresh_s": REFRESH_S},
        }
        if workers > 1:
            config["server"] = {"workers": workers}
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)
        self.config_path = directory / "verifier.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = directory / "verifier.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        # SIGTERMs it did not exit after within its drain bound (its drain overran).
        self.forced_stops = 0

    @property
    def ca_bundle(self) -> Path:
        return self.pki.ca_cert

    @property
    def enrollment_address(self) -> str:
        return f"127.0.0.1:{self.enrollment_port}"

    @property
    def attestation_address(self) -> str:
        return f"127.0.0.1:{self.attestation_port}"

    @property
    def running(self) -> bool:
        """Started and not exited (False after ``stop`` or ``kill`` too)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def exited(self) -> bool:
        """Started, not stopped nor killed by the simulator, and gone: a crash."""
        return self._proc is not None and self._proc.poll() is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def describe(self) -> str:
        workers = f", {self.workers} workers" if self.workers > 1 else ""
        store = f", SQLite {self.database}" if isinstance(self.database, Path) else ""
        name = f"{self.name} " if self.name else ""
        return f"{name}embedded (pid {self.pid}{workers}{store})"

    def start(self) -> None:
        """Start the verifier and wait until both ports accept connections."""
        log = self.log_path.open("ab")
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devtrust.verifier.main",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        for port in (self.enrollment_port, self.attestation_port):
            while True:
                if self._proc.poll() is not None:
                    raise DevtrustError(
                        f"the embedded verifier exited ({self._proc.returncode}) at start: "
                        f"{self.log_tail()}"
                    )
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise DevtrustError(
                            f"the embedded verifier did not listen on port {port} within "
                            f"{START_TIMEOUT_S:.0f} s: {self.log_tail()}"
                        ) from None
                    time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: no drain, streams cut mid-call."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, *, timeout: float = 20.0) -> bool:
        """SIGTERM: the verifier drains (its streams told to reconnect elsewhere) and exits;
        SIGKILL after ``timeout`` (twice its drain bound). False when it overran: it took
        longer than its drain bound (and a margin to exit), or the SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return True
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if time.monotonic() - started > DRAIN_S + EXIT_MARGIN_S:
            self.forced_stops += 1
            return False
        return True

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


async def read_store(database: Path | str, device_ids: set[str]) -> StoreCheck:
    """Decisions stored per device of ``device_ids`` (this run's), and evidence stored twice,
    read through the verifier's storage code (an SQLite file or a PostgreSQL URL alike),
    read-only, after the verifiers stopped."""
    repos = await open_repositories(database, create=False, read_only=True)
    try:
        if not isinstance(repos, SqlRepositories):
            raise DevtrustError(f"cannot read the appraisals of {repos.location}")

        def work(db: Connection) -> list[tuple[str, str]]:
            rows = db.execute(
                "SELECT device_id, detail FROM audit WHERE event = ?", ("appraisal",)
            ).fetchall()
            return [(str(row[0]), str(row[1])) for row in rows]

        rows = await repos.engine.read(work)
    finally:
        await repos.close()
    decisions: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    duplicated = 0
    for device_id, detail in rows:
        if device_id not in device_ids:
            continue  # another run's, in a database given with --database
        decisions[device_id] = decisions.get(device_id, 0) + 1
        digest = _evidence_digest(detail)
        if digest:
            if (device_id, digest) in seen:
                duplicated += 1
            seen.add((device_id, digest))
    return StoreCheck(decisions, duplicated)


def _evidence_digest(detail: str | bytes | None) -> str:
    if not detail:
        return ""
    try:
        doc = json.loads(detail)
    except ValueError:
        return ""
    value = doc.get("evidence_digest", "") if isinstance(doc, dict) else ""
    return value if isinstance(value, str) else ""
