"""Build TPMS_ATTEST / TPMT_SIGNATURE bytes in software (TPM 2.0 Part 2 layouts), to test
the checks a real TPM would never let us violate: wrong magic, wrong type, other hashes."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from devtrust.verifier.tpm.constants import ST_ATTEST_QUOTE, TPM_GENERATED_VALUE, Alg
from devtrust.verifier.tpm.structures import PcrSelect


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def pcr_selection(selection: Sequence[PcrSelect]) -> bytes:
    out = struct.pack(">I", len(selection))
    for sel in selection:
        bitmap = bytearray(3)
        for pcr in sel.pcrs:
            bitmap[pcr // 8] |= 1 << (pcr % 8)
        out += struct.pack(">HB", sel.hash_alg, 3) + bytes(bitmap)
    return out


def attest(
    *,
    extra: bytes,
    selection: Sequence[PcrSelect],
    digest: bytes,
    magic: int = TPM_GENERATED_VALUE,
    type_: int = ST_ATTEST_QUOTE,
    clock: int = 1000,
    reset: int = 0,
    restart: int = 0,
    safe: bool = True,
    firmware: int = 0x2019_1023,
) -> bytes:
    return (
        struct.pack(">IH", magic, type_)
        + tpm2b(b"\x00\x0b" + bytes(32))
        + tpm2b(extra)
        + struct.pack(">QIIB", clock, reset, restart, int(safe))
        + struct.pack(">Q", firmware)
        + pcr_selection(selection)
        + tpm2b(digest)
    )


def ecdsa_signature(
    key: ec.EllipticCurvePrivateKey, message: bytes, *, hash_alg: int = Alg.SHA256
) -> bytes:
    algorithms: dict[int, hashes.HashAlgorithm] = {
        Alg.SHA256: hashes.SHA256(),
        Alg.SHA384: hashes.SHA384(),
        Alg.SHA1: hashes.SHA1(),  # noqa: S303 - a case that must be rejected
    }
    algo = algorithms[hash_alg]
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(algo)))
    size = (key.curve.key_size + 7) // 8
    return (
        struct.pack(">HH", Alg.ECDSA, hash_alg)
        + tpm2b(r.to_bytes(size, "big"))
        + tpm2b(s.to_bytes(size, "big"))
    )


def digest_of(values: Sequence[bytes]) -> bytes:
    return hashlib.sha256(b"".join(values)).digest()


def ecdsa_zero(hash_alg: int = Alg.SHA256) -> bytes:
    return struct.pack(">HH", Alg.ECDSA, hash_alg) + tpm2b(bytes(32)) + tpm2b(bytes(32))
