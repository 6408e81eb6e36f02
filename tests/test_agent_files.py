"""The agent's identity files (issue 9, item 6): every read and write is a coroutine, and the
real files are written on a worker thread (a renewal writes three files with fsync, which must
not hold the event loop every stream shares); the verifier's CA bundle is read once per
enrollment run, not once per attempt."""

from __future__ import annotations

import asyncio
import datetime
import re
import socket
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devtrust.agent import state
from devtrust.agent.channel import VerifierError, VerifierUnreachable
from devtrust.agent.config import AgentConfig, VerifierEndpoint
from devtrust.agent.enroll import enroll_retrying
from devtrust.agent.state import AgentFiles, Enrollment, MemoryFiles, key_pem, new_key
from devtrust.core.claims import DeviceClaims
from devtrust.core.files import write_atomic as files_write_atomic
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.ca import CertificateAuthority, pem
from devtrust.verifier.pki import PkiFiles
from tests.agent_parts import FakeTpm, recorded_host

DEVICE = DeviceId("5e" * 32)
NOW = datetime.datetime.now(datetime.UTC)


def _issue(pki: PkiFiles) -> tuple[x509.Certificate, x509.Certificate]:
    """A device certificate and a channel certificate for one new key."""
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    key = new_key()
    device = ca.issue_device(
        trust_domain="devtrust.local",
        device_id=DEVICE,
        public_key=key.public_key(),
        claims=DeviceClaims(tier=Tier.AFFIRMING, zone=""),
        now=NOW,
        lifetime=datetime.timedelta(hours=1),
    )
    channel = ca.issue_client(
        trust_domain="devtrust.local",
        kind="agent",
        name=DEVICE,
        public_key=key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(days=30),
    )
    return device, channel


def test_agent_files_are_written_off_the_event_loop(
    pki: PkiFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []

    def recording(path: Path, data: bytes, *, mode: int) -> None:
        threads.append(threading.get_ident())
        files_write_atomic(path, data, mode=mode)

    monkeypatch.setattr(state, "write_atomic", recording)
    files = AgentFiles(tmp_path / "state", tmp_path / "run")
    device, channel = _issue(pki)
    key = new_key()
    enrollment = Enrollment(DEVICE, key_pem(key), pem(channel), pki.ca_cert.read_bytes())

    async def scenario() -> tuple[Enrollment | None, x509.Certificate | None, int]:
        loop_thread = threading.get_ident()
        await files.save_enrollment(enrollment)
        der = device.public_bytes(serialization.Encoding.DER)
        await files.save_device_certificate(key, der, pki.ca_cert.read_bytes())
        return await files.load_enrollment(), await files.device_certificate(), loop_thread

    loaded, cert, loop_thread = asyncio.run(scenario())
    assert len(threads) == 7  # four enrollment files, three for the device certificate
    assert loop_thread not in threads
    assert loaded == enrollment
    assert cert == device


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class _CountingFiles(MemoryFiles):
    bundle_reads = 0

    async def read_ca_bundle(self, path: Path) -> bytes:
        self.bundle_reads += 1
        return await super().read_ca_bundle(path)


def _cfg(tmp_path: Path, pki: PkiFiles) -> AgentConfig:
    port = _closed_port()
    return AgentConfig(
        verifier=VerifierEndpoint(
            enrollment=f"127.0.0.1:{port}",
            attestation=f"127.0.0.1:{port}",
            ca_bundle=pki.ca_cert,
        ),
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        rpc_timeout_s=2.0,
        reconnect_max_s=0.05,
    )


def test_the_ca_bundle_is_read_once_per_enrollment_run(pki: PkiFiles, tmp_path: Path) -> None:
    files = _CountingFiles(ca_bundle=pki.ca_cert.read_bytes())
    stop = asyncio.Event()
    with pytest.raises(VerifierUnreachable) as caught:
        asyncio.run(
            enroll_retrying(
                _cfg(tmp_path, pki),
                FakeTpm(),
                files,
                host=recorded_host(),
                stop=stop,
                give_up_s=1.0,
            )
        )
    attempts = re.search(r"no answer in (\d+) attempt", str(caught.value))
    assert attempts is not None, caught.value
    assert int(attempts.group(1)) >= 2, caught.value
    assert files.bundle_reads == 1


def test_an_unusable_ca_bundle_stops_enrollment_before_any_attempt(
    pki: PkiFiles, tmp_path: Path
) -> None:
    files = _CountingFiles(ca_bundle=b"not a certificate")
    tpm = FakeTpm()
    with pytest.raises(VerifierError, match=r"verifier.ca_bundle .*: not a PEM certificate bundle"):
        asyncio.run(
            enroll_retrying(
                _cfg(tmp_path, pki), tpm, files, host=recorded_host(), stop=asyncio.Event()
            )
        )
    assert files.bundle_reads == 1
