"""The verifier's certificate authority and the certificates it issues. Pure: keys, names
and ``now`` in, certificates out (STYLE 11: cryptography's builders, random serials,
validity from the injected time).

Two kinds of self-signed ECDSA P-256 CA, so that a relying party can trust narrowly:
- the verifier's CA (``ca.pem``) signs what the verifier itself accepts or presents:
  ``spiffe://TD/agent/ID``, the attestation-channel certificate given at enrollment (it opens
  the attestation stream and nothing else); ``spiffe://TD/operator/NAME``, operators on the
  query API; servers (DNS and IP SANs, serverAuth);
- device issuing CAs (``DeviceIssuers``) sign only ``spiffe://TD/device/ID``, the short-lived
  device certificate relying parties gate on: an X.509-SVID leaf (SPIFFE X509-SVID sections
  2-4: one URI SAN, cA false, key usage digitalSignature only and critical, EKU serverAuth and
  clientAuth) carrying the trust tier and zone in the claims extension
  (``devtrust.core.claims``, which a relying party reads without this module). Their bundle
  holds no CA of channel, operator or server certificates, so none of those verifies against
  it with any tool.

A new device CA is published in the bundle before it signs (``Issuer.activate_after``), and a
retired one stays in it until the last certificate it signed has expired.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
            # X509-SVID 4.4: when a leaf has an EKU, serverAuth and clientAuth MUST both be
            # set; workloads also serve TLS with their SVID (Envoy, go-spiffe servers).
            eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
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


# --- device issuing CAs ----------------------------------------------------------------------

# The activation time of a device CA that signs from the start (init's).
ALWAYS = datetime.datetime.min.replace(tzinfo=datetime.UTC)


def new_device_ca(now: datetime.datetime) -> CertificateAuthority:
    """A device issuing CA; its name (time made, random tag) tells it apart from the others
    in a bundle, even two made in the same second."""
    stamp = now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"devtrust device CA {stamp} {secrets.token_hex(4)}"
    return CertificateAuthority.create(common_name=name, now=now)


@dataclass(frozen=True)
class Issuer:
    """A device issuing CA. With its key it signs from ``activate_after`` until a newer one
    does, and is published before that. Without (a retired CA) it only stays in the bundle
    while certificates it signed may live: it signed until ``signed_until``."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None
    activate_after: datetime.datetime
    signed_until: datetime.datetime | None = None

    @property
    def ca(self) -> CertificateAuthority:
        if self.key is None:
            raise ValueError(
                f"retired device CA {self.cert.subject.rfc4514_string()} signs nothing"
            )
        return CertificateAuthority(key=self.key, cert=self.cert)


class DeviceIssuers:
    """Which device CA signs now, and which ones a relying party must trust now.

    The newest CA whose activation time has passed signs (the oldest one when none has: it
    is what init made). The bundle holds every CA that signs now or will (published ahead),
    and every older one until ``device_lifetime`` after it stopped signing: by then the last
    certificate it signed has expired. A CA certificate past its own validity is left out.
    ``clock`` is read at each call, so a CA published ahead starts signing at its time
    without a restart."""

    def __init__(
        self,
        issuers: Sequence[Issuer],
        *,
        device_lifetime: datetime.timedelta,
        clock: Callable[[], datetime.datetime],
    ) -> None:
        self._issuers = sorted(issuers, key=lambda i: i.activate_after)
        self._signers = [i for i in self._issuers if i.key is not None]
        if not self._signers:
            raise ValueError("no device issuing CA with its key")
        if any(i.key is None and i.signed_until is None for i in self._issuers):
            raise ValueError("a retired device CA needs the time it signed until")
        self._lifetime = device_lifetime
        self._clock = clock
        self._crl_number = 0

    @property
    def current(self) -> CertificateAuthority:
        """The CA that signs device certificates now."""
        return self.signer_at(self._clock()).ca

    def signer_at(self, now: datetime.datetime) -> Issuer:
        active = [i for i in self._signers if i.activate_after <= now]
        return active[-1] if active else self._signers[0]

    def _signed_until(self, issuer: Issuer) -> datetime.datetime | None:
        if issuer.key is None:
            return issuer.signed_until
        later = [
            i.activate_after for i in self._signers if i.activate_after > issuer.activate_after
        ]
        return later[0] if later else None

    def bundle_at(self, now: datetime.datetime) -> list[x509.Certificate]:
        """The device CAs a relying party trusts at ``now``: the signing one first, then the
        others newest first."""
        signer = self.signer_at(now)
        kept = [signer.cert]
        for issuer in reversed(self._issuers):
            until = self._signed_until(issuer)
            live = until is None or now < until + self._lifetime + CLOCK_SKEW
            if issuer is not signer and live and issuer.cert.not_valid_after_utc > now:
                kept.append(issuer.cert)
        return kept

    def bundle(self) -> list[x509.Certificate]:
        return self.bundle_at(self._clock())

    def bundle_der_at(self, now: datetime.datetime) -> tuple[bytes, ...]:
        """The bundle as sent with a device certificate (DeviceCertificate.trust_bundle_der)."""
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in self.bundle_at(now))

    def sign_crl(
        self,
        revoked: list[tuple[int, datetime.datetime]],
        *,
        now: datetime.datetime,
        next_update: datetime.datetime,
    ) -> x509.CertificateRevocationList:
        """A CRL of ``revoked`` (serial, revocation time), signed by the CA that signs at
        ``now``. Its number (RFC 5280 5.2.3) grows with every CRL, across restarts too: at
        least the time in milliseconds."""
        self._crl_number = max(self._crl_number + 1, int(now.timestamp() * 1000))
        ca = self.signer_at(now).ca
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.cert.subject)
            .last_update(now)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(self._crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
            )
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(ca.key, hashes.SHA256())


@dataclass(frozen=True)
class Rotation:
    """The device CAs after ``ca rotate``: ``promoted`` when the CA published by the previous
    rotation became the current one (its predecessor retired)."""

    current: Issuer
    next: Issuer
    retired: tuple[Issuer, ...]
    promoted: bool


def plan_rotation(
    current: Issuer,
    pending: Issuer | None,
    retired: Sequence[Issuer],
    *,
    now: datetime.datetime,
    activate_after: datetime.timedelta,
    device_lifetime: datetime.timedelta,
) -> Rotation:
    """A new device CA, published now, signing from ``now + activate_after``. A pending CA
    whose time has come is promoted first; one whose time has not is refused (ValueError):
    relying parties may hold it already, and two pending CAs would make the order unclear.
    Retired CAs are dropped once the last certificate they signed has expired."""
    if activate_after < datetime.timedelta(0):
        raise ValueError("--activate-after must not be negative")
    promoted = pending is not None
    if pending is not None:
        if pending.activate_after > now:
            raise ValueError(
                "a next device CA is already published and signs from "
                f"{pending.activate_after.isoformat()}: rotate again after that time"
            )
        retired = [
            *retired,
            replace(current, key=None, signed_until=pending.activate_after),
        ]
        current = pending
    kept = tuple(
        r
        for r in retired
        if r.signed_until is not None and now < r.signed_until + device_lifetime + CLOCK_SKEW
    )
    ca = new_device_ca(now)
    nxt = Issuer(cert=ca.cert, key=ca.key, activate_after=now + activate_after)
    return Rotation(current=current, next=nxt, retired=kept, promoted=promoted)


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
