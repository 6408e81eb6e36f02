"""What binds evidence to a challenge and keys to a TPM; computed alike by the agent (which
makes each) and the verifier (which checks each). Three bindings:

1. The quote's qualifying data is sha256(nonce || sha256(body)) where ``body`` is the exact
   serialized EvidenceBody bytes sent on the wire (DESIGN.md flow 2). Hashing the sent bytes,
   not a re-encoding, means no canonical form is needed: one changed byte after quoting and
   the verifier's recomputation no longer matches what the TPM signed.
2. The enrollment proof: an HMAC under the secret recovered by TPM2_ActivateCredential that
   also binds the enrollment and the channel key to be certified.
3. Proof of possession for the key a device asks the verifier to certify (DESIGN.md,
   "Certificates"). The evidence body names the public key to certify; the quote binds the
   body, so the key is bound to this TPM at this moment. That alone does not show that the
   device *holds* the key: a hostile agent could name another device's key, or the
   verifier's own TLS key, and get it certified under its device id. So the body also
   carries a signature by that key over a context string, the challenge's nonce and the
   device id. A proof made for one challenge or one device is worth nothing for another.
4. Each GPU's attestation report (NVIDIA SPDM GET_MEASUREMENTS) answers a nonce derived from
   the challenge's nonce and the GPU's index, so one challenge binds the quote and every GPU
   report: a report made for another challenge, or for another GPU index of this one, names
   another nonce. The reports travel in the quoted body as well.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

PROOF_LABEL = b"devtrust-enroll-v1"
POSSESSION_CONTEXT = b"devtrust-certify-key-v1\x00"

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


GPU_NONCE_CONTEXT = b"devtrust-gpu-nonce-v1\x00"


def gpu_nonce(nonce: bytes, index: int) -> bytes:
    """The 32-byte nonce GPU ``index`` is asked to sign for the challenge ``nonce``:
    sha256(context || nonce || index as 4 bytes big-endian)."""
    if not 0 <= index < 2**32:
        raise ValueError(f"GPU index {index} is outside 0..2**32-1")
    return hashlib.sha256(GPU_NONCE_CONTEXT + nonce + index.to_bytes(4, "big")).digest()


def qualifying_data(nonce: bytes, body: bytes) -> bytes:
    return hashlib.sha256(nonce + hashlib.sha256(body).digest()).digest()


def proof_for(secret: bytes, enrollment_id: str, channel_key_spki: bytes) -> bytes:
    return hmac.new(
        secret, PROOF_LABEL + enrollment_id.encode() + channel_key_spki, hashlib.sha256
    ).digest()


def possession_message(nonce: bytes, device_id: str) -> bytes:
    """What the key signs: context || nonce || device id (ASCII)."""
    return POSSESSION_CONTEXT + nonce + device_id.encode("ascii")


def _ec_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return hashes.SHA384() if curve.key_size > 256 else hashes.SHA256()


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def sign_possession(key: PrivateKey, nonce: bytes, device_id: str) -> bytes:
    message = possession_message(nonce, device_id)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(_ec_hash(key.curve)))
    return key.sign(message, _pss(), hashes.SHA256())


def possession_proven(key: PublicKey, proof: bytes, nonce: bytes, device_id: str) -> bool:
    """True when ``proof`` is the key's signature over this nonce and device id."""
    if not proof:
        return False
    message = possession_message(nonce, device_id)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(proof, message, ec.ECDSA(_ec_hash(key.curve)))
        else:
            key.verify(proof, message, _pss(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
