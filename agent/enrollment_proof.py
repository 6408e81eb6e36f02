"""The enrollment proof, shared by agent and verifier: an HMAC under the secret recovered by
TPM2_ActivateCredential that also binds the enrollment and the channel key to be certified.
"""

from __future__ import annotations

import hashlib
import hmac

PROOF_LABEL = b"devtrust-enroll-v1"


def proof_for(secret: bytes, enrollment_id: str, channel_key_spki: bytes) -> bytes:
    return hmac.new(
        secret, PROOF_LABEL + enrollment_id.encode() + channel_key_spki, hashlib.sha256
    ).digest()
