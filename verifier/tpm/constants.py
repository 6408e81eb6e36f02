"""TPM 2.0 constants used by the verifier (TPM 2.0 Library, Part 2: Structures, rev 1.59)."""

from __future__ import annotations

import hashlib
from enum import IntEnum, IntFlag


class Alg(IntEnum):
    """TPM_ALG_ID (Part 2, 6.3)."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class EccCurve(IntEnum):
    """TPM_ECC_CURVE (Part 2, 6.4)."""

    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005


class ObjectAttr(IntFlag):
    """TPMA_OBJECT (Part 2, 8.3)."""

    FIXED_TPM = 1 << 1
    ST_CLEAR = 1 << 2
    FIXED_PARENT = 1 << 4
    SENSITIVE_DATA_ORIGIN = 1 << 5
    USER_WITH_AUTH = 1 << 6
    ADMIN_WITH_POLICY = 1 << 7
    NO_DA = 1 << 10
    ENCRYPTED_DUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18


# TPM_GENERATED_VALUE (Part 2, 6.2): the TPM puts it at the start of every structure it signs.
TPM_GENERATED_VALUE = 0xFF544347

# TPM_ST (Part 2, 6.9): attestation structure tags.
ST_ATTEST_CERTIFY = 0x8017
ST_ATTEST_QUOTE = 0x8018
ST_ATTEST_SESSION_AUDIT = 0x8016
ST_ATTEST_COMMAND_AUDIT = 0x8015
ST_ATTEST_TIME = 0x8019
ST_ATTEST_CREATION = 0x801A
ST_ATTEST_NV = 0x8014

HASH_NAMES: dict[int, str] = {
    Alg.SHA1: "sha1",
    Alg.SHA256: "sha256",
    Alg.SHA384: "sha384",
    Alg.SHA512: "sha512",
}
HASH_BY_NAME: dict[str, int] = {name: alg for alg, name in HASH_NAMES.items()}
DIGEST_SIZES: dict[int, int] = {
    alg: hashlib.new(name).digest_size for alg, name in HASH_NAMES.items()
}


def hash_name(alg: int) -> str:
    try:
        return HASH_NAMES[alg]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm 0x{alg:04x}") from None


def hash_alg(name: str) -> int:
    try:
        return HASH_BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm {name!r}") from None
