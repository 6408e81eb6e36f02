"""The EK CA of simulated TPMs (``devtrust.swtpm.soft.SoftTpm``): no TPM manufacturer, and no
production verifier trusts it. A verifier enrolls soft TPMs only when its configuration names
this root's certificate in ``endorsement.trust_simulation_root`` (logged at start).

The root is ECDSA P-256 and self-signed; its EK certificates follow the TCG EK Credential
Profile for TPM Family 2.0 (rev 2.5, 3.2) where a verifier looks: an empty subject with a
critical subjectAltName of TPM manufacturer, model and version attributes (3.2.9),
basicConstraints CA false (3.2.11), keyUsage keyAgreement for an ECC EK (3.2.7) and the EKU
tcg-kp-EKCertificate (3.2.16). Issuing one costs one ECDSA P-256 signature.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

COMMON_NAME = "devtrust simulation EK root (not a TPM manufacturer)"
CERT_FILE = "simulation-ek-root.pem"
KEY_FILE = "simulation-ek-root.key"
ROOT_LIFETIME = datetime.timedelta(days=20 * 365)
# TCG OIDs (TCG OID registry; EK Credential Profile 3.2.9 and 3.2.16).
TCG_TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
TCG_TPM_MODEL = ObjectIdentifier("2.23.133.2.2")
TCG_TPM_VERSION = ObjectIdentifier("2.23.133.2.3")
TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
# The manufacturer id of simulated TPMs: "DVTS", not in the TCG vendor registry.
SIM_MANUFACTURER = "id:44565453"
SIM_MODEL = "devtrust-softtpm"
SIM_VERSION = "id:00010000"

_TPM_ATTRIBUTES = x509.SubjectAlternativeName(
    [
        x509.DirectoryName(
            x509.Name(
                [
                    x509.RelativeDistinguishedName(
                        [x509.NameAttribute(TCG_TPM_MANUFACTURER, SIM_MANUFACTURER)]
                    ),
                    x509.RelativeDistinguishedName([x509.NameAttribute(TCG_TPM_MODEL, SIM_MODEL)]),
                    x509.RelativeDistinguishedName(
                        [x509.NameAttribute(TCG_TPM_VERSION, SIM_VERSION)]
                    ),
                ]
            )
        )
    ]
)
_EK_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


class SimulationRootError(ValueError):
    """The simulation root's files are missing, unreadable or do not belong together."""


@dataclass(frozen=True)
class SimulationRoot:
    """A simulation EK root: ``cert_path`` is what a verifier's
    ``endorsement.trust_simulation_root`` names."""

    directory: Path
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, directory: Path, *, now: datetime.datetime | None = None) -> SimulationRoot:
        """A new root in ``directory`` (made if missing): PEM certificate and key (mode 0600)."""
        now = now or datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devtrust simulation"),
                x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, cert_path, key_path, cert, key)

    @classmethod
    def load(cls, directory: Path) -> SimulationRoot:
        """The root ``create`` saved in ``directory``."""
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except OSError as exc:
            raise SimulationRootError(
                f"simulation root in {directory}: {exc.filename}: {exc.strerror}"
            ) from exc
        except ValueError as exc:
            raise SimulationRootError(f"simulation root in {directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != (
            cert.public_key()
        ):
            raise SimulationRootError(
                f"simulation root in {directory}: {KEY_FILE} is not the key of {CERT_FILE}"
            )
        return cls(directory, cert_path, key_path, cert, key)

    def issue_ek_certificate(
        self, ek_public_key: ec.EllipticCurvePublicKey, *, now: datetime.datetime | None = None
    ) -> bytes:
        """An EK certificate (DER) for ``ek_public_key``, valid from ``now`` (backdated a few
        minutes for clock skew) until the root expires."""
        now = now or datetime.datetime.now(datetime.UTC)
        cert = (
            self._ek_builder.public_key(ek_public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)

    @functools.cached_property
    def _ek_builder(self) -> x509.CertificateBuilder:
        """What every EK certificate of this root has in common (built once: a builder is
        immutable, and its extension checks cost more than the signature)."""
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .not_valid_after(self.certificate.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_EK_KEY_USAGE, critical=True)
            .add_extension(_TPM_ATTRIBUTES, critical=True)
            .add_extension(x509.ExtendedKeyUsage([TCG_KP_EK_CERTIFICATE]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
