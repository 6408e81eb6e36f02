"""The two services as a host runs them: `devtrust-verifier serve` and `devtrust-agent run`,
separate processes with YAML configuration files, stopped by SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from devtrust.core.spiffe import spiffe_ids
from devtrust.swtpm import EndorsementCA
from devtrust.verifier.pki import PkiFiles
from tests.conftest import SwtpmFactory

pytestmark = pytest.mark.swtpm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_verifier_and_agent_services(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA, swtpm_factory: SwtpmFactory
) -> None:
    from devtrust.swtpm.bootlog import header_only_log
    from devtrust.swtpm.hosttree import write_host_tree

    tpm = swtpm_factory()
    enroll_port, attest_port = _free_port(), _free_port()
    verifier_yaml = tmp_path / "verifier.yaml"
    verifier_yaml.write_text(
        yaml.safe_dump(
            {
                "database": str(tmp_path / "verifier.db"),
                "listen": {
                    "enrollment": f"127.0.0.1:{enroll_port}",
                    "attestation": f"127.0.0.1:{attest_port}",
                },
                "tls": {"server_cert": str(pki.server_cert), "server_key": str(pki.server_key)},
                "ca": {"cert": str(pki.ca_cert), "key": str(pki.ca_key)},
                "endorsement": {"trust_swtpm_local_ca": str(endorsement_ca.cert_path)},
                "attestation": {"interval_s": 30},
            }
        )
    )
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text(
        yaml.safe_dump(
            {
                "verifier": {
                    "enrollment": f"127.0.0.1:{enroll_port}",
                    "attestation": f"127.0.0.1:{attest_port}",
                    "ca_bundle": str(pki.ca_cert),
                },
                "tpm": {"tcti": tpm.tcti},
                "state_dir": str(tmp_path / "agent-state"),
                "runtime_dir": str(tmp_path / "agent-run"),
                "event_log": str(header_only_log(tmp_path / "event-log.bin")),
                "gpu_source": "none",
                "posture_root": str(write_host_tree(tmp_path / "host")),
            }
        )
    )
    log = (tmp_path / "verifier.log").open("w")
    verifier = subprocess.Popen(
        [sys.executable, "-m", "devtrust.verifier.main", "serve", "--config", str(verifier_yaml)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    agent = None
    try:
        _wait(lambda: _listening(attest_port), "the verifier's port")
        agent = subprocess.Popen(
            [sys.executable, "-m", "devtrust.agent.main", "run", "--config", str(agent_yaml)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        device_pem = tmp_path / "agent-run" / "device.pem"
        _wait(device_pem.exists, "the device certificate")
        cert = x509.load_pem_x509_certificate(device_pem.read_bytes())
        device_id = (tmp_path / "agent-state" / "device-id").read_text().strip()
        assert spiffe_ids(cert) == [f"spiffe://devtrust.local/device/{device_id}"]
        verifier.send_signal(signal.SIGHUP)  # reload the policy, keep serving
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        verifier.send_signal(signal.SIGTERM)
        code = verifier.wait(timeout=15)
        log.close()
    text = (tmp_path / "verifier.log").read_text()
    assert code == 0, text
    assert "SIGHUP: policy devtrust-default-gpu-hosts-1 loaded" in text
    assert "tier=affirming" in text
