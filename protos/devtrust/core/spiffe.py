"""SPIFFE identities (https://spiffe.io, the SPIFFE-ID and X509-SVID specifications) of what
the verifier certifies: ``spiffe://TRUST-DOMAIN/KIND/NAME``, KIND one of:

- ``device``: the short-lived device certificate relying parties gate on (NAME: device id);
- ``agent``: the attestation-channel certificate given at enrollment (NAME: device id);
- ``operator``: operators on the query API (NAME: the operator's name).
"""

from __future__ import annotations

from typing import Final

from cryptography import x509

DEVICE: Final = "device"
AGENT: Final = "agent"
OPERATOR: Final = "operator"
KINDS: Final = (DEVICE, AGENT, OPERATOR)


def spiffe_id(trust_domain: str, kind: str, name: str) -> str:
    return f"spiffe://{trust_domain}/{kind}/{name}"


def spiffe_name(uri: str, *, trust_domain: str, kind: str) -> str | None:
    """NAME when ``uri`` is exactly ``spiffe://trust_domain/kind/NAME`` (one non-empty path
    segment), else None: another domain, kind or a deeper path is not this identity."""
    prefix = f"spiffe://{trust_domain}/{kind}/"
    if not uri.startswith(prefix):
        return None
    name = uri[len(prefix) :]
    return name if name and "/" not in name else None


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The certificate's SPIFFE IDs: its URI SANs of scheme spiffe."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]


def certificate_name(cert: x509.Certificate, *, trust_domain: str, kind: str) -> str | None:
    """NAME of the first of the certificate's SPIFFE IDs that is a ``kind`` identity of
    ``trust_domain``; None when it has none. Reads, does not verify: the chain must already
    be verified (gRPC's mTLS, or ``cryptography.x509.verification``)."""
    for uri in spiffe_ids(cert):
        name = spiffe_name(uri, trust_domain=trust_domain, kind=kind)
        if name is not None:
            return name
    return None
