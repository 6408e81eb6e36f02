"""The agent's identities and where it keeps them (``interfaces.IdentityFiles``).

``AgentFiles``, on hosts: state_dir (persistent, 0700): device-id, channel.key (0600),
channel.pem, verifier-ca.pem. runtime_dir (tmpfs, 0711: searchable, not listable, so that
workloads reach the Workload API socket and the files by name): device.key (0600, or 0640 with
``key_gid`` as its group: workload_api.key_group), device.pem, ca-bundle.pem (the bundle that
verifies device certificates): what local workloads present to relying parties. The key and
certificate are deleted when the device loses trust (revoked, or expired unrenewed). Every file
is written atomically (with fsync), and every read and write runs on a worker thread: a
renewal's three files are not written on the event loop the streams share. ``MemoryFiles``:
the same in memory, for simulated devices and tests.
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.core.files import write_atomic

CHANNEL_RENEW_BEFORE = datetime.timedelta(days=1)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def der_to_pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    channel_key_pem: bytes
    channel_cert_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True)
class DeviceIdentity:
    """The device certificate with its key and the bundle that verifies it: what the
    Workload API serves (``devtrust.agent.workload``)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    bundle: tuple[x509.Certificate, ...]


def bundle_pem(bundle: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle)


@dataclass(frozen=True)
class AgentFiles:
    state_dir: Path
    runtime_dir: Path
    # The group that may read device.key (mode 0640); None: only the agent's user (0600).
    key_gid: int | None = None

    def _dirs(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o711)

    async def load_enrollment(self, *, now: datetime.datetime | None = None) -> Enrollment | None:
        """The saved channel identity, or None when there is none or its certificate is in
        its last day (the agent then enrolls again, with a new channel key)."""
        saved = await asyncio.to_thread(self._read_enrollment)
        return None if saved is None else usable(saved, now=now)

    def _read_enrollment(self) -> Enrollment | None:
        paths = [
            self.state_dir / n
            for n in ("device-id", "channel.key", "channel.pem", "verifier-ca.pem")
        ]
        if not all(p.exists() for p in paths):
            return None
        device_id, key, cert, ca = (p.read_bytes() for p in paths)
        return Enrollment(device_id.decode().strip(), key, cert, ca)

    async def save_enrollment(self, enrollment: Enrollment) -> None:
        await asyncio.to_thread(self._write_enrollment, enrollment)

    def _write_enrollment(self, enrollment: Enrollment) -> None:
        self._dirs()
        write_atomic(self.state_dir / "channel.key", enrollment.channel_key_pem, mode=0o600)
        write_atomic(self.state_dir / "channel.pem", enrollment.channel_cert_pem, mode=0o644)
        write_atomic(self.state_dir / "verifier-ca.pem", enrollment.ca_pem, mode=0o644)
        write_atomic(
            self.state_dir / "device-id", enrollment.device_id.encode() + b"\n", mode=0o644
        )

    async def save_device_certificate(
        self, key: ec.EllipticCurvePrivateKey, cert_der: bytes, ca_pem: bytes
    ) -> None:
        pem = der_to_pem(cert_der)
        await asyncio.to_thread(self._write_device_certificate, key_pem(key), pem, ca_pem)

    def _write_device_certificate(self, key: bytes, cert: bytes, ca_pem: bytes) -> None:
        self._dirs()
        if self.key_gid is None:
            write_atomic(self.runtime_dir / "device.key", key, mode=0o600)
        else:
            write_atomic(self.runtime_dir / "device.key", key, mode=0o640, group=self.key_gid)
        write_atomic(self.runtime_dir / "device.pem", cert, mode=0o644)
        write_atomic(self.runtime_dir / "ca-bundle.pem", ca_pem, mode=0o644)

    async def device_certificate(self) -> x509.Certificate | None:
        return await asyncio.to_thread(self._read_device_certificate)

    def _read_device_certificate(self) -> x509.Certificate | None:
        path = self.runtime_dir / "device.pem"
        if not path.exists() or not (self.runtime_dir / "device.key").exists():
            return None
        try:
            return x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            return None

    async def device_identity(self) -> DeviceIdentity | None:
        return await asyncio.to_thread(self._read_device_identity)

    def _read_device_identity(self) -> DeviceIdentity | None:
        paths = [self.runtime_dir / n for n in ("device.key", "device.pem", "ca-bundle.pem")]
        try:
            key_data, cert_data, bundle_data = (p.read_bytes() for p in paths)
            key = serialization.load_pem_private_key(key_data, password=None)
            cert = x509.load_pem_x509_certificate(cert_data)
            bundle = tuple(x509.load_pem_x509_certificates(bundle_data))
        except (OSError, ValueError):
            return None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return None
        return DeviceIdentity(key, cert, bundle)

    async def delete_device_certificate(self) -> None:
        await asyncio.to_thread(self._delete_device_certificate)

    def _delete_device_certificate(self) -> None:
        for name in ("device.key", "device.pem"):
            (self.runtime_dir / name).unlink(missing_ok=True)

    async def read_ca_bundle(self, path: Path) -> bytes:
        return await asyncio.to_thread(path.read_bytes)


def usable(enrollment: Enrollment, *, now: datetime.datetime | None) -> Enrollment | None:
    """``enrollment``, unless its channel certificate is unreadable or in its last day."""
    try:
        not_after = x509.load_pem_x509_certificate(enrollment.channel_cert_pem).not_valid_after_utc
    except ValueError:
        return None
    now = now or datetime.datetime.now(datetime.UTC)
    return None if not_after - now < CHANNEL_RENEW_BEFORE else enrollment


@dataclass
class MemoryFiles:
    """Identities in memory: a simulated device's, or a test's. ``saved`` counts the device
    certificates written, so a test sees that a renewal was stored and nothing else was
    (``deleted``, the deletions);
    ``ca_bundle`` is what ``read_ca_bundle`` returns, whatever the path."""

    enrollment: Enrollment | None = None
    certificate: x509.Certificate | None = None
    key: ec.EllipticCurvePrivateKey | None = None
    ca_pem: bytes = b""
    ca_bundle: bytes = b""
    saved: int = 0
    deleted: int = 0

    async def load_enrollment(self, *, now: datetime.datetime | None = None) -> Enrollment | None:
        return None if self.enrollment is None else usable(self.enrollment, now=now)

    async def save_enrollment(self, enrollment: Enrollment) -> None:
        self.enrollment = enrollment

    async def device_certificate(self) -> x509.Certificate | None:
        return self.certificate

    async def save_device_certificate(
        self, key: ec.EllipticCurvePrivateKey, cert_der: bytes, ca_pem: bytes
    ) -> None:
        self.key, self.ca_pem = key, ca_pem
        self.certificate = x509.load_der_x509_certificate(cert_der)
        self.saved += 1

    async def device_identity(self) -> DeviceIdentity | None:
        if self.certificate is None or self.key is None:
            return None
        bundle = tuple(x509.load_pem_x509_certificates(self.ca_pem)) if self.ca_pem else ()
        return DeviceIdentity(self.key, self.certificate, bundle)

    async def delete_device_certificate(self) -> None:
        self.certificate = self.key = None
        self.deleted += 1

    async def read_ca_bundle(self, path: Path) -> bytes:
        return self.ca_bundle


def renewal_due(cert: x509.Certificate | None, *, now: datetime.datetime, renew_at: float) -> bool:
    if cert is None:
        return True
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= start + (end - start) * renew_at
