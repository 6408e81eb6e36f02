"""Who is calling (verifier/identity.py): an agent's channel certificate names its device id,
which is parsed where it enters the verifier; an operator's names the operator."""

from __future__ import annotations

import datetime
from typing import Any, cast

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.core.spiffe import AGENT, OPERATOR
from devtrust.verifier.ca import CertificateAuthority, pem
from devtrust.verifier.errors import Unauthenticated
from devtrust.verifier.identity import peer_device_id, peer_identity

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)
DEVICE = "ab" * 32


class _Context:
    """The part of a gRPC servicer context that identity reads: the verified peer chain."""

    def __init__(self, pems: list[bytes]) -> None:
        self._pems = pems

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": self._pems} if self._pems else {}


def _peer(kind: str, name: str) -> grpc.aio.ServicerContext[Any, Any]:
    ca = CertificateAuthority.create(common_name="test CA", now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_client(
        kind=kind,
        trust_domain="fleet.example",
        name=name,
        public_key=key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(hours=1),
    )
    return cast("grpc.aio.ServicerContext[Any, Any]", _Context([pem(cert)]))


def test_an_agent_certificate_names_its_device_id() -> None:
    assert peer_device_id(_peer(AGENT, DEVICE), trust_domain="fleet.example") == DEVICE
    # An operator's name is a name, not a device id: read as it is.
    assert peer_identity(_peer(OPERATOR, "alice"), trust_domain="fleet.example", kind=OPERATOR) == (
        "alice"
    )


# 64 characters at most: the certificate's common name is the name too.
@pytest.mark.parametrize(
    "name", ["d", "AB" * 32, "ab" * 31, "zz" * 32, "ab" * 31 + "a\t", "-" * 64]
)
def test_an_agent_name_that_is_no_device_id_is_refused(name: str) -> None:
    """The CA writes only device ids into agent certificates; one that names anything else
    opens no stream, whatever signed it."""
    with pytest.raises(Unauthenticated, match="is not 64 lowercase hex digits"):
        peer_device_id(_peer(AGENT, name), trust_domain="fleet.example")


def test_no_agent_identity_is_refused_before_any_parsing() -> None:
    with pytest.raises(Unauthenticated, match=r"is not a agent identity of fleet\.example"):
        peer_device_id(_peer(OPERATOR, DEVICE), trust_domain="fleet.example")
    with pytest.raises(Unauthenticated, match="needs a client certificate"):
        peer_device_id(cast("grpc.aio.ServicerContext[Any, Any]", _Context([])), trust_domain="t")
