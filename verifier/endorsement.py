"""Endorsements: is this EK certificate from a TPM manufacturer we trust?

Chains are built and checked by ``cryptography.x509.verification`` (STYLE 11), never by
hand. EK certificates are not web PKI client certificates: they often have an empty subject,
a critical SAN of TPM manufacturer attributes (TCG EK Credential Profile 2.0, 3.2.9) and the
EKU tcg-kp-EKCertificate rather than clientAuth. So the end-entity policy is
``permit_all`` (extensions are not judged on the leaf), while issuing certificates keep the
web PKI CA defaults (basicConstraints CA, keyCertSign). Which quirks of real EK certificates
we accept beyond that is issue 3's to decide against the corpus.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from verifier.errors import ConfigError, MalformedInput, Rejected

logger = logging.getLogger(__name__)
CERT_SUFFIXES = frozenset({".pem", ".crt", ".cer", ".der"})


def load_certificates(data: bytes, *, source: str) -> list[x509.Certificate]:
    """PEM (one or many) or a single DER certificate."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise MalformedInput(f"{source}: not an X.509 certificate: {exc}") from exc


def parse_ek_certificate(der: bytes) -> x509.Certificate:
    if not der:
        raise MalformedInput("EK certificate is empty")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise MalformedInput(f"EK certificate is not DER X.509: {exc}") from exc


@dataclass(frozen=True)
class EndorsementStore:
    """Trusted EK roots; where each came from is kept for the start-up log."""

    roots: tuple[x509.Certificate, ...]
    sources: tuple[str, ...]

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> EndorsementStore:
        roots: list[x509.Certificate] = []
        sources: list[str] = []
        for path in paths:
            files = (
                sorted(p for p in path.iterdir() if p.suffix.lower() in CERT_SUFFIXES)
                if path.is_dir()
                else [path]
            )
            for file in files:
                try:
                    certs = load_certificates(file.read_bytes(), source=str(file))
                except (OSError, MalformedInput) as exc:
                    raise ConfigError(f"endorsement root {file}: {exc}") from exc
                roots.extend(certs)
                sources.extend([str(file)] * len(certs))
        if not roots:
            raise ConfigError("no endorsement roots configured: no EK certificate could verify")
        return cls(roots=tuple(roots), sources=tuple(sources))

    def verify(
        self,
        ek_cert: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        *,
        now: datetime.datetime,
    ) -> list[x509.Certificate]:
        """Return the verified chain, leaf first, or raise ``Rejected`` naming the issuer."""
        verifier = (
            PolicyBuilder()
            .store(Store(list(self.roots)))
            .time(now)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        try:
            return list(verifier.verify(ek_cert, list(intermediates)).chain)
        except VerificationError as exc:
            raise Rejected(
                f"EK certificate (issuer {ek_cert.issuer.rfc4514_string() or '<empty>'}, "
                f"serial {ek_cert.serial_number:x}) does not chain to a trusted endorsement "
                f"root: {exc}"
            ) from exc
