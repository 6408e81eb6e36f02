"""The Revocations service's messages at the gRPC edge (STYLE 4): feed entries and the CRL
(verifier/revocation.py) to their messages. Its requests carry nothing to convert."""

from __future__ import annotations

from devtrust.v1 import query_pb2
from devtrust.verifier.revocation import RevocationEntry, SignedCrl
from devtrust.verifier.wire import timestamp


def revocation_event_to_wire(entry: RevocationEntry) -> query_pb2.RevocationEvent:
    """A revoked certificate of the snapshot or of now, or the end-of-snapshot marker."""
    cert = entry.revoked
    if cert is None:
        return query_pb2.RevocationEvent(end_of_snapshot=True)
    return query_pb2.RevocationEvent(
        serial_hex=cert.serial,
        device_id=cert.device_id,
        revoked_at=timestamp(cert.revoked_at),
        reason=cert.reason,
        not_after=timestamp(cert.not_after),
        snapshot=entry.snapshot,
    )


def crl_to_wire(crl: SignedCrl) -> query_pb2.Crl:
    return query_pb2.Crl(
        crl_der=crl.der,
        this_update=timestamp(crl.this_update),
        next_update=timestamp(crl.next_update),
    )
