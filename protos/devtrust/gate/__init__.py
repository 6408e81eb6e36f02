"""The gate, for relying parties: may the holder of a device certificate in?

It imports only ``devtrust.core``, cryptography and grpc (tests/test_layers.py), so that a
service gating on device certificates installs without a TPM or GPU library:

- ``decision``: the pure decision (``decide``) and its values;
- ``adapters``: the gate on a gRPC or grpc.aio server's calls, or a Python TLS connection;
- ``follower``: ``RevocationFollower``, the verifier's revocation feed (the one module that
  needs protobuf, for the generated ``devtrust.v1``; imported by name, not from here);
- ``command``: ``devtrust gate check``.
"""

from devtrust.gate.adapters import (
    CURRENT_DECISION,
    AioGateInterceptor,
    Gate,
    GateInterceptor,
    GatePolicy,
    require_device,
    require_device_aio,
    tls_peer_chain,
)
from devtrust.gate.decision import Bundle, GateDecision, Reason, RevocationList, decide

__all__ = [
    "CURRENT_DECISION",
    "AioGateInterceptor",
    "Bundle",
    "Gate",
    "GateDecision",
    "GateInterceptor",
    "GatePolicy",
    "Reason",
    "RevocationList",
    "decide",
    "require_device",
    "require_device_aio",
    "tls_peer_chain",
]
