"""Parse the TPM 2.0 structures the verifier receives: TPM2B_PUBLIC, TPMS_ATTEST and
TPMT_SIGNATURE (TPM 2.0 Library Part 2). Big-endian throughout (Part 1, 18.1 marshalling).

Plain ``struct`` parsing costs about 3 us for a TPMS_ATTEST, a tenth of a generic unmarshal
(DESIGN.md "Costs"); this is the hot path of every appraisal. Every parse checks lengths and
raises ``MalformedInput`` naming the structure and byte offset; trailing bytes are an error.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.tpm.constants import (
    DIGEST_SIZES,
    Alg,
    EccCurve,
    hash_name,
)

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_CURVES: dict[int, ec.EllipticCurve] = {
    EccCurve.NIST_P256: ec.SECP256R1(),
    EccCurve.NIST_P384: ec.SECP384R1(),
    EccCurve.NIST_P521: ec.SECP521R1(),
}
_CURVE_IDS: dict[str, int] = {curve.name: cid for cid, curve in _CURVES.items()}


class _Reader:
    """Cursor over a bytes buffer; every read checks bounds."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def _need(self, n: int, field: str) -> None:
        if self.pos + n > len(self.buf):
            raise MalformedInput(
                f"{self.what}: truncated at byte {self.pos} reading {field} "
                f"(need {n} bytes, {len(self.buf) - self.pos} left)"
            )

    def u8(self, field: str) -> int:
        self._need(1, field)
        (v,) = _U8.unpack_from(self.buf, self.pos)
        self.pos += 1
        return int(v)

    def u16(self, field: str) -> int:
        self._need(2, field)
        (v,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def u32(self, field: str) -> int:
        self._need(4, field)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, field: str) -> int:
        self._need(8, field)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def raw(self, n: int, field: str) -> bytes:
        self._need(n, field)
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def tpm2b(self, field: str) -> bytes:
        return self.raw(self.u16(f"{field}.size"), field)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise MalformedInput(
                f"{self.what}: {len(self.buf) - self.pos} unexpected bytes after the structure "
                f"at byte {self.pos}"
            )


# --- TPMT_PUBLIC (Part 2, 12.2.4) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublicArea:
    """A parsed TPMT_PUBLIC. ``marshalled`` is the exact TPMT_PUBLIC bytes (for the name)."""

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: int
    scheme: int
    scheme_hash: int
    # RSA
    rsa_bits: int
    rsa_exponent: int
    rsa_modulus: bytes
    # ECC
    curve: int
    ecc_x: bytes
    ecc_y: bytes
    marshalled: bytes

    @property
    def name(self) -> bytes:
        """TPM name: nameAlg || H_nameAlg(TPMT_PUBLIC) (Part 1, 16 "Names")."""
        digest = hashlib.new(hash_name(self.name_alg), self.marshalled).digest()
        return _U16.pack(self.name_alg) + digest

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        if self.type == Alg.RSA:
            if not self.rsa_modulus:
                raise MalformedInput("TPMT_PUBLIC: RSA key with an empty modulus")
            try:
                return rsa.RSAPublicNumbers(
                    self.rsa_exponent or 65537, int.from_bytes(self.rsa_modulus, "big")
                ).public_key()
            except ValueError as exc:  # an even exponent, one above the modulus, ...
                raise MalformedInput(f"TPMT_PUBLIC: not an RSA public key: {exc}") from exc
        if self.type == Alg.ECC:
            curve = _CURVES.get(self.curve)
            if curve is None:
                raise MalformedInput(f"TPMT_PUBLIC: unsupported ECC curve 0x{self.curve:04x}")
            try:
                return ec.EllipticCurvePublicNumbers(
                    int.from_bytes(self.ecc_x, "big"), int.from_bytes(self.ecc_y, "big"), curve
                ).public_key()
            except ValueError as exc:
                raise MalformedInput(f"TPMT_PUBLIC: ECC point is not on the curve: {exc}") from exc
        raise MalformedInput(f"TPMT_PUBLIC: type 0x{self.type:04x} has no public key")


def _sym_def_object(r: _Reader) -> int:
    alg = r.u16("symmetric.algorithm")
    if alg != Alg.NULL:
        r.u16("symmetric.keyBits")
        r.u16("symmetric.mode")
    return alg


def parse_public(data: bytes, *, sized: bool = True) -> PublicArea:
    """Parse a TPM2B_PUBLIC (``sized``) or a bare TPMT_PUBLIC."""
    what = "TPM2B_PUBLIC" if sized else "TPMT_PUBLIC"
    if sized:
        outer = _Reader(data, what)
        data = outer.tpm2b("publicArea")
        outer.end()
    r = _Reader(data, what)
    type_ = r.u16("type")
    name_alg = r.u16("nameAlg")
    if name_alg not in DIGEST_SIZES:
        raise MalformedInput(f"{what}: unsupported nameAlg 0x{name_alg:04x}")
    attributes = r.u32("objectAttributes")
    auth_policy = r.tpm2b("authPolicy")
    rsa_bits = rsa_exp = curve = 0
    rsa_mod = ecc_x = ecc_y = b""
    scheme: int = Alg.NULL
    scheme_hash: int = Alg.NULL
    symmetric: int
    if type_ == Alg.RSA:
        symmetric = _sym_def_object(r)
        scheme = r.u16("scheme.scheme")
        if scheme not in (Alg.NULL, Alg.RSAES):
            scheme_hash = r.u16("scheme.hashAlg")
        rsa_bits = r.u16("keyBits")
        rsa_exp = r.u32("exponent")
        rsa_mod = r.tpm2b("unique.rsa")
    elif type_ == Alg.ECC:
        symmetric = _sym_def_object(r)
        scheme = r.u16("scheme.scheme")
        if scheme != Alg.NULL:
            scheme_hash = r.u16("scheme.hashAlg")
            if scheme == Alg.ECDAA:
                r.u16("scheme.count")
        curve = r.u16("curveID")
        if r.u16("kdf.scheme") != Alg.NULL:
            r.u16("kdf.hashAlg")
        ecc_x = r.tpm2b("unique.ecc.x")
        ecc_y = r.tpm2b("unique.ecc.y")
    elif type_ == Alg.KEYEDHASH:
        symmetric = Alg.NULL
        scheme = r.u16("scheme.scheme")
        if scheme == Alg.HMAC:
            scheme_hash = r.u16("scheme.hashAlg")
        elif scheme == Alg.XOR:
            scheme_hash = r.u16("scheme.hashAlg")
            r.u16("scheme.kdf")
        r.tpm2b("unique.keyedHash")
    elif type_ == Alg.SYMCIPHER:
        symmetric = _sym_def_object(r)
        r.tpm2b("unique.sym")
    else:
        raise MalformedInput(f"{what}: unknown object type 0x{type_:04x}")
    r.end()
    return PublicArea(
        type=type_,
        name_alg=name_alg,
        attributes=attributes,
        auth_policy=auth_policy,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
        rsa_bits=rsa_bits,
        rsa_exponent=rsa_exp,
        rsa_modulus=rsa_mod,
        curve=curve,
        ecc_x=ecc_x,
        ecc_y=ecc_y,
        marshalled=data,
    )


TPM_RH_ENDORSEMENT = 0x4000000B


def qualified_name(parent_qualified_name: bytes, area: PublicArea) -> bytes:
    """QN(child) = nameAlg || H_nameAlg(QN(parent) || Name(child)) (Part 1, 16.6); the QN of
    a hierarchy is its handle."""
    digest = hashlib.new(hash_name(area.name_alg), parent_qualified_name + area.name).digest()
    return _U16.pack(area.name_alg) + digest


def ak_qualified_names(ak: PublicArea, ek: PublicArea) -> frozenset[bytes]:
    """Where an AK may live: a primary in the endorsement hierarchy (devtrust's agent) or a
    child of the EK (tpm2_createak, Keylime)."""
    hierarchy = TPM_RH_ENDORSEMENT.to_bytes(4, "big")
    return frozenset(
        {
            qualified_name(hierarchy, ak),
            qualified_name(qualified_name(hierarchy, ek), ak),
        }
    )


def public_key_matches(area: PublicArea, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bool:
    """True when the TPM public area holds the same key as ``key`` (from a certificate)."""
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        return (
            area.type == Alg.RSA
            and int.from_bytes(area.rsa_modulus, "big") == nums.n
            and (area.rsa_exponent or 65537) == nums.e
        )
    pnums = key.public_numbers()
    return (
        area.type == Alg.ECC
        and area.curve == _CURVE_IDS.get(key.curve.name)
        and int.from_bytes(area.ecc_x, "big") == pnums.x
        and int.from_bytes(area.ecc_y, "big") == pnums.y
    )


# --- TPMS_ATTEST (Part 2, 10.12.12) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcrSelect:
    """One TPMS_PCR_SELECTION: a bank and its PCR indices, ascending."""

    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Attest:
    """A parsed TPMS_ATTEST. For a quote, ``pcr_select`` and ``pcr_digest`` are set."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_select: tuple[PcrSelect, ...]
    pcr_digest: bytes


def _pcr_selection_list(r: _Reader) -> tuple[PcrSelect, ...]:
    count = r.u32("pcrSelect.count")
    if count > 16:
        raise MalformedInput(f"{r.what}: {count} PCR selections is more than TPM2_NUM_PCR_BANKS")
    out = []
    for i in range(count):
        alg = r.u16(f"pcrSelect[{i}].hash")
        size = r.u8(f"pcrSelect[{i}].sizeofSelect")
        bitmap = r.raw(size, f"pcrSelect[{i}].pcrSelect")
        pcrs = tuple(
            byte * 8 + bit for byte, b in enumerate(bitmap) for bit in range(8) if b & (1 << bit)
        )
        out.append(PcrSelect(alg, pcrs))
    return tuple(out)


def parse_attest(data: bytes) -> Attest:
    """Parse TPMS_ATTEST (the bytes the TPM signed; what ``tpm2_quote -m`` writes)."""
    r = _Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    type_ = r.u16("type")
    signer = r.tpm2b("qualifiedSigner")
    extra = r.tpm2b("extraData")
    clock = r.u64("clockInfo.clock")
    reset = r.u32("clockInfo.resetCount")
    restart = r.u32("clockInfo.restartCount")
    safe = r.u8("clockInfo.safe")
    fw = r.u64("firmwareVersion")
    selection: tuple[PcrSelect, ...] = ()
    digest = b""
    if type_ == 0x8018:  # TPM_ST_ATTEST_QUOTE: TPMS_QUOTE_INFO
        selection = _pcr_selection_list(r)
        digest = r.tpm2b("attested.quote.pcrDigest")
        r.end()
    # Other attestation types are parsed up to the union; the caller rejects them by type.
    return Attest(
        magic=magic,
        type=type_,
        qualified_signer=signer,
        extra_data=extra,
        clock=clock,
        reset_count=reset,
        restart_count=restart,
        safe=safe == 1,
        firmware_version=fw,
        pcr_select=selection,
        pcr_digest=digest,
    )


# --- TPMT_SIGNATURE (Part 2, 11.3.4) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    alg: int
    hash_alg: int
    # RSA: the signature; ECC: r and s.
    rsa_sig: bytes
    ecc_r: bytes
    ecc_s: bytes


def parse_signature(data: bytes) -> Signature:
    r = _Reader(data, "TPMT_SIGNATURE")
    alg = r.u16("sigAlg")
    rsa_sig = ecc_r = ecc_s = b""
    if alg in (Alg.RSASSA, Alg.RSAPSS):
        hash_alg = r.u16("signature.hash")
        rsa_sig = r.tpm2b("signature.sig")
    elif alg in (Alg.ECDSA, Alg.ECDAA, Alg.SM2, Alg.ECSCHNORR):
        hash_alg = r.u16("signature.hash")
        ecc_r = r.tpm2b("signature.signatureR")
        ecc_s = r.tpm2b("signature.signatureS")
    elif alg == Alg.HMAC:
        hash_alg = r.u16("signature.hashAlg")
        r.raw(DIGEST_SIZES.get(hash_alg, 0), "signature.digest")
    elif alg == Alg.NULL:
        hash_alg = Alg.NULL
    else:
        raise MalformedInput(f"TPMT_SIGNATURE: unknown signature algorithm 0x{alg:04x}")
    r.end()
    return Signature(alg=alg, hash_alg=hash_alg, rsa_sig=rsa_sig, ecc_r=ecc_r, ecc_s=ecc_s)
