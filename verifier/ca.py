"""The verifier's certificate authority and the certificates it issues. Pure: keys, names
and ``now`` in, certificates out (STYLE 11: cryptography's builders, random serials,
validity from the injected time).

One ECDSA P-256 root signs four kinds of leaf, told apart by their SPIFFE ID path:
- ``spiffe://TD/device/ID``: the short-lived device certificate relying parties gate on; it
  carries the trust tier and zone in the claims extension (``devtrust.core.claims``, which a
  relying party reads without this module);
- ``spiffe://TD/agent/ID``: the attestation-channel certificate given at enrollment; it
  opens the attestation stream and nothing else;
- ``spiffe://TD/operator/NAME``: operators on the query API;
- servers: DNS and IP SANs, serverAuth.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtrust.core.binding import PublicKey
from devtrust.core.claims import DeviceClaims
from devtrust.core.files import write_atomic
from devtrust.core.ids import DeviceId
from devtrust.core.spiffe import AGENT, DEVICE, OPERATOR, spiffe_id

CLOCK_SKEW = datetime.timedelta(minutes=1)


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(
        cls,
        *,
        common_name: str,
        now: datetime.datetime,
        lifetime: datetime.timedelta = datetime.timedelta(days=3650),
    ) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devtrust"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{key_path}: the CA key must be an ECDSA key")
        if key.public_key() != cert.public_key():
            raise ValueError(f"{key_path} is not the key of {cert_path}")
        return cls(key=key, cert=cert)

    def save(self, cert_path: Path, key_path: Path) -> None:
        write_private_key(key_path, self.key)
        write_atomic(cert_path, pem(self.cert), mode=0o644)

    def _leaf(
        self,
        *,
        public_key: PublicKey,
        common_name: str,
        role: str,
        now: datetime.datetime,
        lifetime: datetime.timedelta,
        eku: list[x509.ObjectIdentifier],
        sans: list[x509.GeneralName],
        extra: list[x509.ExtensionType] | None = None,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devtrust"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        for ext in extra or []:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_device(
        self,
        *,
        trust_domain: str,
        device_id: DeviceId,
        public_key: PublicKey,
        claims: DeviceClaims,
        now: datetime.datetime,
        lifetime: datetime.timedelta,
    ) -> x509.Certificate:
        return self._leaf(
            public_key=public_key,
            common_name=device_id,
            role="device",
            now=now,
            lifetime=lifetime,
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            sans=[x509.UniformResourceIdentifier(spiffe_id(trust_domain, DEVICE, device_id))],
            extra=[claims.to_extension()],
        )

    def issue_client(
        self,
        *,
        trust_domain: str,
        kind: str,
        name: str,
        public_key: PublicKey,
        now: datetime.datetime,
        lifetime: datetime.timedelta,
    ) -> x509.Certificate:
        """A clientAuth identity spiffe://TD/KIND/NAME: kind "agent" (the attestation channel)
        or "operator" (the query API). Device certificates are issued by issue_device."""
        if kind not in (AGENT, OPERATOR):
            raise ValueError(f"unknown client kind {kind!r}")
        return self._leaf(
            public_key=public_key,
            common_name=name,
            role=kind,
            now=now,
            lifetime=lifetime,
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            sans=[x509.UniformResourceIdentifier(spiffe_id(trust_domain, kind, name))],
        )

    def issue_server(
        self,
        *,
        hostnames: list[str],
        public_key: PublicKey,
        now: datetime.datetime,
        lifetime: datetime.timedelta,
    ) -> x509.Certificate:
        sans: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._leaf(
            public_key=public_key,
            common_name=hostnames[0],
            role="server",
            now=now,
            lifetime=lifetime,
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=sans,
        )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomic(path, private_key_pem(key), mode=0o600)
