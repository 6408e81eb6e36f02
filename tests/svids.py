"""Device X.509-SVIDs for tests, made here rather than by the verifier's CA: the Workload API
serves what it is given, and these follow the SPIFFE X.509-SVID profile exactly (one spiffe URI
SAN, not a CA, digitalSignature, clientAuth), under a device issuing CA of their own."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtrust.agent.state import DeviceIdentity
from devtrust.core.ids import DeviceId

TRUST_DOMAIN = "devtrust.local"
DEVICE = DeviceId("5e" * 32)
SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/device/{DEVICE}"


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """keyCertSign and cRLSign for a CA, digitalSignature alone for an X.509-SVID."""
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
    )
    return x509.KeyUsage(
        digital_signature=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
        **flags,
    )


def device_ca(
    name: str = "devtrust device issuing CA",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


CA = device_ca()


def identity(
    *, serial: int, lifetime: datetime.timedelta = datetime.timedelta(hours=1)
) -> DeviceIdentity:
    """A device X.509-SVID (one spiffe URI SAN, not a CA, digitalSignature, clientAuth)."""
    ca_key, ca_cert = CA
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)]),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return DeviceIdentity(key, cert, (ca_cert,))


CA_SUBJECT = CA[1].subject.rfc4514_string()
