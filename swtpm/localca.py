"""A local endorsement CA for swtpm_setup's ``--create-ek-cert``.

swtpm_localca signs EK certificates with the key and issuer certificate named in its config
file; we make both with cryptography so each test run (and each demo) has its own root, and
no production verifier trusts it unless its configuration names it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class EndorsementCA:
    """Files of a local EK CA: ``cert_path`` is what a verifier would trust."""

    directory: Path
    cert_path: Path
    key_path: Path
    setup_config: Path

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        common_name: str = "devtrust swtpm endorsement CA",
        now: datetime.datetime | None = None,
        pcr_banks: str = "sha1,sha256",
    ) -> EndorsementCA:
        """Make a CA (RSA-2048, as swtpm_cert signs with it) and the swtpm_setup config."""
        directory.mkdir(parents=True, exist_ok=True)
        now = now or datetime.datetime.now(datetime.UTC)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        key_path = directory / "signkey.pem"
        cert_path = directory / "issuercert.pem"
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "certserial").write_text("1\n")
        localca_conf = directory / "swtpm-localca.conf"
        localca_conf.write_text(
            f"statedir = {directory}\n"
            f"signingkey = {key_path}\n"
            f"issuercert = {cert_path}\n"
            f"certserial = {directory / 'certserial'}\n"
        )
        options = directory / "swtpm-localca.options"
        options.write_text(
            "--platform-manufacturer devtrust\n--platform-version 2.1\n--platform-model swtpm\n"
        )
        setup_config = directory / "swtpm_setup.conf"
        setup_config.write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {localca_conf}\n"
            f"create_certs_tool_options = {options}\n"
            f"active_pcr_banks = {pcr_banks}\n"
        )
        return cls(
            directory=directory, cert_path=cert_path, key_path=key_path, setup_config=setup_config
        )
