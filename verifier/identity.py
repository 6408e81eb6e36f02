"""Who is calling: the SPIFFE ID of the verified client certificate on an mTLS port.

gRPC has already verified the chain to the devtrust CA (``require_client_auth``); here the
role and name are read from the URI SAN ``spiffe://TRUST-DOMAIN/KIND/NAME``. An agent's NAME
is its device id, parsed here once: past this point a device id is a ``DeviceId``.
"""

from __future__ import annotations

from typing import Any

import grpc
from cryptography import x509

from devtrust.core.ids import DeviceId, parse_device_id
from devtrust.core.spiffe import AGENT, certificate_name, spiffe_ids
from devtrust.verifier.errors import Unauthenticated


def peer_identity(
    context: grpc.aio.ServicerContext[Any, Any], *, trust_domain: str, kind: str
) -> str:
    """Return NAME from the peer's ``spiffe://trust_domain/kind/NAME``, or refuse."""
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or [])
    if not pems:
        raise Unauthenticated(
            f"this call needs a client certificate for spiffe://{trust_domain}/{kind}/..."
        )
    cert = x509.load_pem_x509_certificate(pems[0])
    name = certificate_name(cert, trust_domain=trust_domain, kind=kind)
    if name is not None:
        return name
    raise Unauthenticated(
        f"client certificate {cert.subject.rfc4514_string()} is not a "
        f"{kind} identity of {trust_domain} (SPIFFE IDs: "
        f"{', '.join(spiffe_ids(cert)) or 'none'})"
    )


def peer_device_id(context: grpc.aio.ServicerContext[Any, Any], *, trust_domain: str) -> DeviceId:
    """The device id the peer's agent certificate names, or refuse. The CA writes only
    device ids there, but what a certificate says is checked where it enters, not trusted
    to be well formed wherever it is used (a path, a query, a log line)."""
    name = peer_identity(context, trust_domain=trust_domain, kind=AGENT)
    try:
        return parse_device_id(name)
    except ValueError as exc:
        raise Unauthenticated(f"agent client certificate: {exc}") from None
