"""Provision and run swtpm processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from devtrust.swtpm.localca import EndorsementCA

logger = logging.getLogger(__name__)


class SwtpmError(RuntimeError):
    """swtpm could not be provisioned or started."""


def swtpm_available() -> bool:
    return all(shutil.which(tool) for tool in ("swtpm", "swtpm_setup", "swtpm_localca"))


def provision(state_dir: Path, ca: EndorsementCA, *, pcr_banks: str = "sha1,sha256") -> None:
    """Manufacture a TPM 2.0 in state_dir: RSA and ECC EKs with certificates from ca."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        "swtpm_setup",
        "--tpm2",
        "--tpm-state",
        str(state_dir),
        "--create-ek-cert",
        "--config",
        str(ca.setup_config),
        "--pcr-banks",
        pcr_banks,
        "--overwrite",
        "--logfile",
        str(state_dir / "swtpm_setup.log"),
    ]
    # swtpm_setup runs a swtpm of its own: a process group lets us stop both if interrupted.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        proc.communicate(timeout=60)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        log = (state_dir / "swtpm_setup.log").read_text(errors="replace")[-2000:]
        raise SwtpmError(f"swtpm_setup failed ({proc.returncode}) in {state_dir}: {log}")


def _free_port_pair() -> int:
    """A port P such that P and P + 1 are free on loopback now (the swtpm TCTI expects the
    control channel at port + 1). Another process may take them before swtpm binds: the
    caller retries when swtpm exits at start."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            port = int(server.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ctrl:
                try:
                    ctrl.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise SwtpmError("no free pair of consecutive loopback ports")


class Swtpm:
    """One running ``swtpm socket`` process over a provisioned state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, *, timeout: float = 10.0, attempts: int = 5) -> Swtpm:
        for attempt in range(attempts):
            self.port = _free_port_pair()
            cmd = [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
                "--log",
                f"file={self.state_dir / 'swtpm.log'},level=1",
            ]
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                self._wait_ready(timeout)
            except SwtpmError:
                self.stop()
                if attempt == attempts - 1:
                    raise
                continue
            except BaseException:  # interrupted: leave no process behind
                self.stop()
                raise
            logger.debug("swtpm pid %s ready on port %s", self.pid, self.port)
            return self
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        """Readiness: the control channel answers CMD_GET_CAPABILITY (swtpm ioctl 0x01)."""
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise SwtpmError(f"swtpm exited with {self._proc.returncode}: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.5) as s:
                    s.sendall((1).to_bytes(4, "big"))
                    if len(s.recv(12)) >= 4:
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise SwtpmError(f"swtpm on port {self.port} not ready after {timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> Swtpm:
        return self if self._proc else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
