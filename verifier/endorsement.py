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
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from devtrust.core.errors import ConfigError
from devtrust.verifier.errors import MalformedInput, Rejected

logger = logging.getLogger(__name__)
CERT_SUFFIXES = frozenset({".pem", ".crt", ".cer", ".der"})


def _must_be_ca(policy: object, cert: x509.Certificate, ext: x509.BasicConstraints | None) -> None:
    if ext is None or not ext.ca:
        raise ValueError(f"{cert.subject.rfc4514_string()} is not a CA (basicConstraints)")


def _may_sign_certificates(
    policy: object, cert: x509.Certificate, ext: x509.KeyUsage | None
) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError(f"{cert.subject.rfc4514_string()} lacks keyCertSign")


# Issuers of EK certificates: basicConstraints CA is required and keyUsage, when present,
# must allow keyCertSign. Everything else is permitted, because real TPM vendor CAs carry
# what web PKI forbids: EKUs without anyExtendedKeyUsage (Google's EK intermediates carry
# tcg-kp-EKCertificate), and critical certificatePolicies (STMicroelectronics).
_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _must_be_ca)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _may_sign_certificates)
    .may_be_present(x509.CertificatePolicies, Criticality.AGNOSTIC, None)
)
# EK certificates: TCG's extensions (EK Credential Profile 2.0, 3.2), not TLS's. A critical
# SAN of TPM manufacturer attributes and critical certificatePolicies are accounted for.
_EE_POLICY = (
    ExtensionPolicy.permit_all()
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.CertificatePolicies, Criticality.AGNOSTIC, None)
)


def strip_nv_padding(der: bytes) -> bytes:
    """The DER certificate without padding after it.

    Quirk accepted: EK certificates read from TPM NV can be followed by 0xFF (or 0x00) fill up
    to the NV index's size (STMicroelectronics ST33, in the corpus; OpenSSL ignores it).
    Only fill bytes are cut: any other trailing data is still an error.
    """
    if len(der) < 4 or der[0] != 0x30:
        return der
    first = der[1]
    if first < 0x80:
        total = 2 + first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            return der
        total = 2 + count + int.from_bytes(der[2 : 2 + count], "big")
    rest = der[total:]
    if rest and total < len(der) and (set(rest) <= {0xFF} or set(rest) <= {0x00}):
        return der[:total]
    return der


def load_certificates(data: bytes, *, source: str) -> list[x509.Certificate]:
    """PEM (one or many) or a single DER certificate."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(strip_nv_padding(data))]
    except ValueError as exc:
        raise MalformedInput(f"{source}: not an X.509 certificate: {exc}") from exc


def parse_ek_certificate(der: bytes) -> x509.Certificate:
    if not der:
        raise MalformedInput("EK certificate is empty")
    try:
        with warnings.catch_warnings():  # vendor certificates bend RFC 5280; judged below
            warnings.simplefilter("ignore")
            return x509.load_der_x509_certificate(strip_nv_padding(der))
    except ValueError as exc:
        raise MalformedInput(f"EK certificate is not DER X.509: {exc}") from exc


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _parse_each(data: bytes, source: str) -> tuple[list[x509.Certificate], list[str]]:
    """Every certificate of a PEM bundle or DER file, and why the others were skipped."""
    blocks = _PEM_BLOCK.findall(data) if b"-----BEGIN" in data else [data]
    certs, skipped = [], []
    for n, block in enumerate(blocks):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                certs.extend(load_certificates(block, source=source))
        except MalformedInput as exc:
            skipped.append(f"{source} #{n}: {exc}")
    return certs, skipped


def _self_signed(cert: x509.Certificate) -> bool:
    with warnings.catch_warnings():  # vendor names bend RFC 5280 attribute lengths
        warnings.simplefilter("ignore")
        if cert.issuer != cert.subject:
            return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class EndorsementStore:
    """Trusted EK roots; where each came from is kept for the start-up log."""

    roots: tuple[x509.Certificate, ...]
    sources: tuple[str, ...]
    # CA certificates that are not self-signed (vendor intermediates shipped beside the roots):
    # untrusted, offered to path building only, like intermediates an agent sends.
    intermediates: tuple[x509.Certificate, ...] = ()

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> EndorsementStore:
        """Load certificates from files and directories (recursively: .pem .crt .cer .der).

        A certificate that cryptography cannot parse is skipped and logged, not fatal: real
        vendor CAs include some (Nuvoton's encode their names' SETs out of DER order).
        """
        roots: list[x509.Certificate] = []
        sources: list[str] = []
        intermediates: list[x509.Certificate] = []
        skipped: list[str] = []
        paths = list(paths)
        for path in paths:
            files = (
                sorted(p for p in path.rglob("*") if p.suffix.lower() in CERT_SUFFIXES)
                if path.is_dir()
                else [path]
            )
            for file in files:
                try:
                    data = file.read_bytes()
                except OSError as exc:
                    raise ConfigError(f"endorsement root {file}: {exc.strerror}") from exc
                certs, bad = _parse_each(data, str(file))
                skipped.extend(bad)
                for cert in certs:
                    if _self_signed(cert):
                        roots.append(cert)
                        sources.append(str(file))
                    else:
                        intermediates.append(cert)
        if skipped:
            logger.info(
                "endorsement store: %d certificates cryptography cannot parse were "
                "skipped (see verifier/data/ek-roots/PROVENANCE.md)",
                len(skipped),
            )
        for reason in skipped:
            logger.debug("endorsement store: skipped %s", reason)
        if not roots:
            where = ", ".join(str(p) for p in paths) or "nowhere (endorsement.roots is empty)"
            raise ConfigError(
                f"no endorsement roots (self-signed CA certificates, PEM or DER) in {where}: "
                "no EK certificate could verify; fix `endorsement.roots:` in the configuration"
            )
        return cls(roots=tuple(roots), sources=tuple(sources), intermediates=tuple(intermediates))

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
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        try:
            return list(verifier.verify(ek_cert, [*intermediates, *self.intermediates]).chain)
        except VerificationError as exc:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                issuer = ek_cert.issuer.rfc4514_string() or "<empty>"
            raise Rejected(
                f"EK certificate (issuer {issuer}, "
                f"serial {ek_cert.serial_number:x}) does not chain to a trusted endorsement "
                f"root: {exc}"
            ) from exc
