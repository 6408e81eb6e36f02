"""`devtrust-verifier serve` as a real process for fault tests (issue 12): started on given
or free ports with a configuration written from a mapping, stopped by its pid (SIGTERM: it
drains; SIGKILL: it dies), started again on the same ports and database; and what the
database holds of a device's appraisals, read through the repository interfaces (SQLite or
PostgreSQL alike)."""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml

from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.storage import open_repositories

if TYPE_CHECKING:
    from devtrust.verifier.server import RunningVerifier

SERVE = (sys.executable, "-m", "devtrust.verifier.main", "serve")
_LISTENING = re.compile(
    r"verifier listening: enrollment \(TLS\) on (\d+), attestation\+query \(mTLS\) on (\d+)"
)
_APPRAISAL = re.compile(r"appraisal device=(\w+) tier=(\w+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    path: Path,
    pki: PkiFiles,
    ek_ca: EndorsementCA,
    *,
    database: str,
    ports: tuple[int, int] = (0, 0),
    **sections: Any,
) -> Path:
    """A verifier configuration for tests: ``sections`` replace or add top-level keys."""
    config: dict[str, Any] = {
        "database": database,
        "listen": {
            "enrollment": f"127.0.0.1:{ports[0]}",
            "attestation": f"127.0.0.1:{ports[1]}",
        },
        "tls": {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key)},
        "ca": {"cert": str(pki.ca_cert), "key": str(pki.ca_key)},
        "endorsement": {"roots": [], "trust_swtpm_local_ca": str(ek_ca.cert_path)},
        "attestation": {"interval_s": 30, "stream_challenge_gap_s": 0},
        "policy": None,
        "operators": {"alice": "admin"},
        **sections,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class VerifierProcess:
    """One `serve` process: its configuration, log, ports (what tests.env's agent helpers
    read of a verifier)."""

    config: Path
    log: Path
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    enrollment_port: int = 0
    attestation_port: int = 0
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def verifier(self) -> RunningVerifier:
        return cast("RunningVerifier", self)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self, limit_s: float = 60.0) -> None:
        """Start it and wait until it listens (its log says so)."""
        before = len(_LISTENING.findall(self.text())) if self.log.exists() else 0
        with self.log.open("ab") as out:
            # faulthandler: a verifier that hangs is stopped with SIGABRT (``wait``), which
            # writes every thread's stack to its log.
            self.process = subprocess.Popen(
                [*SERVE, "--config", str(self.config), *self.extra],
                stdout=out,
                stderr=out,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )
        self.starts += 1
        deadline = time.monotonic() + limit_s
        while True:
            found = _LISTENING.findall(self.text())
            if len(found) > before:
                self.enrollment_port, self.attestation_port = map(int, found[-1])
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the verifier exited ({self.process.returncode}):\n{self.text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the verifier did not start:\n{self.text()}")
            time.sleep(0.05)

    def appraisals(self, device_id: str) -> list[str]:
        """The tiers of this device's appraisals this process logged, in order."""
        return [t for d, t in _APPRAISAL.findall(self.text()) if d == device_id]

    def kill(self) -> None:
        """SIGKILL, and its end awaited."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        assert self.process.poll() is None
        self.process.send_signal(sig)

    def wait(self, limit_s: float) -> int:
        """Its exit status once it exited (within ``limit_s``, else the test fails)."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # its stacks, to the log
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            raise AssertionError(f"still running after {limit_s} s:\n{self.text()}") from None
        self.exit_codes.append(code)
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.wait(60)


@contextmanager
def verifier_process(
    workdir: Path, config: Path, *, extra: tuple[str, ...] = (), name: str = "verifier"
) -> Iterator[VerifierProcess]:
    """A started `serve` process, stopped (SIGTERM) at the end if it still runs."""
    proc = VerifierProcess(config, workdir / f"{name}.log", extra)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def stored_appraisals(database: str, device_id: str) -> list[dict[str, Any]]:
    """The device's stored appraisals (their audit entries' results), oldest first."""
    repos = await open_repositories(database, create=False)
    try:
        entries = await repos.audit.history(DeviceId(device_id), limit=100_000)
    finally:
        await repos.close()
    return [e.detail for e in reversed(entries) if e.event == "appraisal"]


async def stored_serials(database: str, device_id: str) -> set[str]:
    """The device's certificates the store holds, live (not expired, not revoked)."""
    repos = await open_repositories(database, create=False)
    try:
        now = datetime.datetime.now(datetime.UTC)
        certs = await repos.revocations.live_certificates(DeviceId(device_id), now)
    finally:
        await repos.close()
    return {c.serial for c in certs}
