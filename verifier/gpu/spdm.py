"""NVIDIA GPU attestation reports: the SPDM 1.1 GET_MEASUREMENTS request and the signed
MEASUREMENTS response that nvtrust's local_gpu_verifier writes as one hex string, parsed with
``struct`` (no I/O) and verified offline: the ECDSA P-384 signature over the SHA-384 of the
transcript, the nonce, and the certificate chain to NVIDIA's Device Identity CA; and the
firmware ID (FWID) the attestation key's certificate was issued for (``certificate_fwid``:
its TCG DICE extension, read with a small bounded DER reader).

Every length is bounded by the bytes present; a malformed report raises ``SpdmFormatError``
naming the field, its offset in the report, what was expected and what was found; a malformed
DICE extension raises ``TcbInfoError`` the same way.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from devtrust.verifier.errors import MalformedInput, Rejected

__all__ = [
    "TCG_DICE_MULTI_TCB_INFO",
    "TCG_DICE_TCB_INFO",
    "CertificateFwid",
    "MeasurementBlock",
    "MeasurementsRequest",
    "MeasurementsResponse",
    "SpdmChainError",
    "SpdmFormatError",
    "SpdmNonceError",
    "SpdmReport",
    "SpdmSignatureError",
    "TcbInfoError",
    "certificate_fwid",
    "extension_fwid",
    "parse_report",
    "parse_report_hex",
    "verify_chain",
    "verify_nonce",
    "verify_signature",
]

SPDM_VERSION_1_1 = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
SIGNATURE_REQUESTED = 0x01
ALL_MEASUREMENTS = 0xFF
NONCE_SIZE = 32
SIGNATURE_SIZE = 96  # ECDSA P-384, raw r || s
DMTF_MEASUREMENT_SPEC = 0x01

# NVIDIA's opaque data field ids (nvtrust spdm_msrt_resp_msg.py), the ones named here.
OPAQUE_FIELDS = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "msrscnt",
    13: "cprinfo",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
}
_STRING_FIELDS = frozenset(
    {"driver_version", "chip_sku", "chip_sku_mod", "project", "project_sku", "project_sku_mod"}
)


class SpdmFormatError(MalformedInput):
    """Bytes that do not parse as an SPDM attestation report."""

    def __init__(self, field: str, offset: int, expected: str, found: str) -> None:
        super().__init__(
            f"SPDM report field {field} at offset {offset}: expected {expected}, found {found}"
        )
        self.field = field
        self.offset = offset


class SpdmSignatureError(Rejected):
    """The MEASUREMENTS signature does not verify with the leaf certificate's key."""


class SpdmNonceError(Rejected):
    """The request's or response's nonce is not the one the caller expected."""


class SpdmChainError(Rejected):
    """The certificate chain does not verify to the given root."""


@dataclass(frozen=True, slots=True)
class MeasurementsRequest:
    version: int
    param1: int
    param2: int
    nonce: bytes
    slot_id: int | None
    raw: bytes

    @property
    def signature_requested(self) -> bool:
        return bool(self.param1 & SIGNATURE_REQUESTED)


@dataclass(frozen=True, slots=True)
class MeasurementBlock:
    index: int
    specification: int
    value_type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class MeasurementsResponse:
    version: int
    param1: int
    param2: int
    blocks: tuple[MeasurementBlock, ...]
    nonce: bytes
    opaque_data: bytes
    opaque: dict[str, object]
    signature: bytes
    signed_part: bytes  # the response up to, not including, the signature


@dataclass(frozen=True, slots=True)
class SpdmReport:
    request: MeasurementsRequest
    response: MeasurementsResponse

    @property
    def transcript(self) -> bytes:
        """What the signature covers: request || response without its signature."""
        return self.request.raw + self.response.signed_part

    @property
    def driver_version(self) -> str | None:
        value = self.response.opaque.get("driver_version")
        return value if isinstance(value, str) else None

    @property
    def vbios_version(self) -> str | None:
        value = self.response.opaque.get("vbios_version")
        return value if isinstance(value, str) else None


class _Reader:
    def __init__(self, data: bytes, base: int = 0) -> None:
        self.data = data
        self.pos = 0
        self.base = base

    def take(self, n: int, field: str) -> bytes:
        left = len(self.data) - self.pos
        if n > left:
            raise SpdmFormatError(field, self.base + self.pos, f"{n} bytes", f"{left} bytes left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u24(self, field: str) -> int:
        return int.from_bytes(self.take(3, field), "little")

    def expect(self, field: str, want: int) -> int:
        offset = self.base + self.pos
        got = self.u8(field)
        if got != want:
            raise SpdmFormatError(field, offset, f"0x{want:02x}", f"0x{got:02x}")
        return got

    @property
    def offset(self) -> int:
        return self.base + self.pos


def _vbios_version(value: bytes) -> str:
    """NVIDIA's form: 8 bytes, two little-endian u32s; 96009F00, 00000001 -> 96.00.9F.00.01."""
    if len(value) != 8:
        return value.hex()
    major, minor = struct.unpack("<II", value)
    digits = f"{major:08X}"
    return ".".join(digits[i : i + 2] for i in range(0, 8, 2)) + f".{minor & 0xFF:02X}"


def _parse_opaque(data: bytes, base: int) -> dict[str, object]:
    """NVIDIA's opaque data: (type u16, size u16, value) records; unknown types kept raw."""
    reader = _Reader(data, base)
    fields: dict[str, object] = {}
    while reader.pos < len(data):
        kind_offset = reader.offset
        kind = reader.u16("opaque data field type")
        size = reader.u16("opaque data field size")
        value = reader.take(size, f"opaque data field {kind} value")
        name = OPAQUE_FIELDS.get(kind, f"type_{kind}")
        if name in fields:  # two driver versions, say: ambiguous, never last-one-wins
            raise SpdmFormatError(
                "opaque data field type", kind_offset, f"field {kind} once", "a repeat"
            )
        parsed: object = value
        if name in _STRING_FIELDS:
            parsed = value.split(b"\x00", 1)[0].decode("ascii", "replace")
        elif name == "vbios_version":
            parsed = _vbios_version(value)
        fields[name] = parsed
    return fields


def _parse_request(reader: _Reader) -> MeasurementsRequest:
    reader.expect("request SPDMVersion", SPDM_VERSION_1_1)
    reader.expect("request RequestResponseCode", GET_MEASUREMENTS)
    param1 = reader.u8("request Param1")
    param2 = reader.u8("request Param2")
    nonce = slot_id = None
    if param1 & SIGNATURE_REQUESTED:
        nonce = reader.take(NONCE_SIZE, "request Nonce")
        slot_id = reader.u8("request SlotIDParam")  # SPDM 1.1: present with a signature
    if nonce is None:
        raise SpdmFormatError(
            "request Param1", 2, "signature requested (bit 0 set)", f"0x{param1:02x}"
        )
    return MeasurementsRequest(
        SPDM_VERSION_1_1, param1, param2, nonce, slot_id, reader.data[: reader.pos]
    )


def _parse_response(reader: _Reader) -> MeasurementsResponse:
    start = reader.pos
    version = reader.expect("response SPDMVersion", SPDM_VERSION_1_1)
    reader.expect("response RequestResponseCode", MEASUREMENTS)
    param1 = reader.u8("response Param1")
    param2 = reader.u8("response Param2")
    count = reader.u8("response NumberOfBlocks")
    record_length = reader.u24("response MeasurementRecordLength")
    record_offset = reader.offset
    record = _Reader(reader.take(record_length, "response MeasurementRecord"), record_offset)
    blocks: list[MeasurementBlock] = []
    for n in range(count):
        index_offset = record.offset
        index = record.u8(f"measurement block {n} Index")
        if any(block.index == index for block in blocks):
            raise SpdmFormatError(
                f"measurement block {n} Index", index_offset, f"index {index} once", "a repeat"
            )
        spec = record.u8(f"measurement block {index} MeasurementSpecification")
        size = record.u16(f"measurement block {index} MeasurementSize")
        body_offset = record.offset
        body = _Reader(record.take(size, f"measurement block {index} Measurement"), body_offset)
        if spec != DMTF_MEASUREMENT_SPEC:
            raise SpdmFormatError(
                f"measurement block {index} MeasurementSpecification",
                body.base - 3,
                "0x01 (DMTF)",
                f"0x{spec:02x}",
            )
        value_type = body.u8(f"measurement block {index} DMTFSpecMeasurementValueType")
        value_size = body.u16(f"measurement block {index} DMTFSpecMeasurementValueSize")
        value = body.take(value_size, f"measurement block {index} DMTFSpecMeasurementValue")
        if body.pos != size:
            raise SpdmFormatError(
                f"measurement block {index} Measurement",
                body.offset,
                f"{size} bytes used",
                f"{body.pos} bytes used",
            )
        blocks.append(MeasurementBlock(index, spec, value_type, value))
    if record.pos != record_length:
        raise SpdmFormatError(
            "response MeasurementRecord",
            record.offset,
            f"{count} blocks filling {record_length} bytes",
            f"{record_length - record.pos} bytes left over",
        )
    nonce = reader.take(NONCE_SIZE, "response Nonce")
    opaque_length = reader.u16("response OpaqueLength")
    opaque_offset = reader.offset
    opaque_data = reader.take(opaque_length, "response OpaqueData")
    opaque = _parse_opaque(opaque_data, opaque_offset)
    signed_part = reader.data[start : reader.pos]
    signature = reader.take(SIGNATURE_SIZE, "response Signature")
    if reader.pos != len(reader.data):
        raise SpdmFormatError(
            "report end",
            reader.offset,
            "no bytes after the Signature",
            f"{len(reader.data) - reader.pos} bytes",
        )
    return MeasurementsResponse(
        version,
        param1,
        param2,
        tuple(blocks),
        nonce,
        opaque_data,
        opaque,
        signature,
        signed_part,
    )


def parse_report(data: bytes) -> SpdmReport:
    """Parse request || response; ``SpdmFormatError`` names the field that does not fit."""
    reader = _Reader(bytes(data))
    request = _parse_request(reader)
    response = _parse_response(reader)
    return SpdmReport(request, response)


def parse_report_hex(text: str) -> SpdmReport:
    """The report as nvtrust writes it: one hex string."""
    try:
        data = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise SpdmFormatError("report", 0, "hex digits", str(exc)) from None
    return parse_report(data)


def verify_signature(report: SpdmReport, leaf: x509.Certificate) -> None:
    """ECDSA P-384 over SHA-384 of the transcript, with the leaf (attestation) key."""
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise SpdmSignatureError(
            f"SPDM signature: expected a P-384 leaf key, found {type(key).__name__}"
        )
    raw = report.response.signature
    der = encode_dss_signature(int.from_bytes(raw[:48], "big"), int.from_bytes(raw[48:], "big"))
    try:
        key.verify(der, report.transcript, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise SpdmSignatureError(
            f"SPDM signature: expected a valid ECDSA P-384 signature by "
            f"{leaf.subject.rfc4514_string()} over the transcript, found it does not verify"
        ) from None


def verify_nonce(report: SpdmReport, expected: bytes) -> None:
    """The request's nonce must be the caller's challenge. (The response's Nonce is the
    responder's own, per SPDM; it is covered by the signature, not compared.)"""
    found = report.request.nonce
    if not hmac.compare_digest(found, expected):
        raise SpdmNonceError(f"SPDM request nonce: expected {expected.hex()}, found {found.hex()}")


def verify_chain(
    chain: Sequence[x509.Certificate], root: x509.Certificate, at: datetime
) -> list[x509.Certificate]:
    """Verify leaf-first ``chain`` to ``root`` at time ``at`` with cryptography's x509
    verification (NVIDIA's GH100 chain needs no quirks). A copy of the root at the end of the
    chain is ignored. Returns the verified path, leaf first."""
    if not chain:
        raise SpdmChainError("GPU certificate chain: expected a leaf, found no certificates")
    intermediates = [cert for cert in chain[1:] if cert != root]
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(at)
        .max_chain_depth(len(chain) + 1)
        .build_client_verifier()
    )
    try:
        result = verifier.verify(chain[0], intermediates)
    except VerificationError as exc:
        raise SpdmChainError(
            f"GPU certificate chain: expected a path from {chain[0].subject.rfc4514_string()} "
            f"to {root.subject.rfc4514_string()}, found: {exc}"
        ) from None
    return list(result.chain)


# --- the firmware ID the attestation key's certificate was issued for (TCG DICE) ------------
#
# NVIDIA's verifier (nvtrust local_gpu_verifier, cc_admin_utils.verify_gpu_certificate_chain)
# compares the FWID of the report's opaque data (field 20) with the one in the leaf's
# extension 2.23.133.5.4.1; it skips the comparison when the report has no FWID. That OID
# names two structures:
#
# - TCG DICE Attestation Architecture 1.1, 6.1.1: tcg-dice-TcbInfo, a DiceTcbInfo SEQUENCE of
#   OPTIONAL IMPLICIT context-tagged fields: vendor [0], model [1], version [2], svn [3],
#   layer [4], index [5], fwids [6] SEQUENCE SIZE (1..MAX) OF FWID, flags [7], vendorInfo
#   [8], type [9], flagsMask [10], ... (later versions add fields after these); tcg-dice-
#   MultiTcbInfo (2.23.133.5.4.5) is a SEQUENCE SIZE (1..MAX) OF DiceTcbInfo. nvtrust reads
#   Blackwell leaves this way (certs/__init__.py TcbInfoExtension, the first FWID).
# - Microsoft RIoT's (DICE's predecessor) CompositeDeviceID under the same OID: SEQUENCE
#   { version INTEGER, deviceID SubjectPublicKeyInfo, fwid FWID }. NVIDIA's Hopper leaves
#   ("GH100 A01 GSP FMC LF") carry this one, its deviceID the issuing GSP BROM's key; nvtrust
#   takes its last 48 bytes.
#
# FWID ::= SEQUENCE { hashAlg OBJECT IDENTIFIER, digest OCTET STRING } in both. The first
# element tells them apart: an INTEGER (RIoT) or a context tag (DiceTcbInfo).

TCG_DICE_TCB_INFO = x509.ObjectIdentifier("2.23.133.5.4.1")
TCG_DICE_MULTI_TCB_INFO = x509.ObjectIdentifier("2.23.133.5.4.5")
_HASHES = {  # NIST hash algorithm OIDs (RFC 5754): name, digest size
    "2.16.840.1.101.3.4.2.1": ("SHA-256", 32),
    "2.16.840.1.101.3.4.2.2": ("SHA-384", 48),
    "2.16.840.1.101.3.4.2.3": ("SHA-512", 64),
}
_MAX_EXTENSION = 4096  # NVIDIA's is 189 bytes
_MAX_FWIDS = 16
_MAX_TCB_INFOS = 16
_MAX_OID = 32  # content bytes
_FWIDS_TAG = 6  # DiceTcbInfo fwids [6]
_DER_INTEGER, _DER_OCTET_STRING, _DER_OID, _DER_SEQUENCE = 0x02, 0x04, 0x06, 0x30


class TcbInfoError(MalformedInput):
    """The attestation key certificate's TCG DICE extension does not parse, or holds no
    FWID; the message names the certificate, the extension, the field and its offset."""


@dataclass(frozen=True, slots=True)
class CertificateFwid:
    """The FWID a certificate's DICE extension declares: ``digest`` under ``hash_alg``
    (dotted OID), read from ``source`` (which extension, in which form)."""

    hash_alg: str
    digest: bytes
    source: str

    @property
    def hash_name(self) -> str:
        known = _HASHES.get(self.hash_alg)
        return known[0] if known else self.hash_alg


class _Der:
    """DER TLVs of ``data`` one at a time: single-byte tags, definite minimal lengths within
    the bytes present; offsets are from the start of the extension's value."""

    def __init__(self, data: bytes, base: int, where: str) -> None:
        self.data = data
        self.pos = 0
        self.base = base
        self.where = where

    def fail(self, field: str, offset: int, expected: str, found: str) -> TcbInfoError:
        return TcbInfoError(
            f"{self.where}: {field} at offset {offset}: expected {expected}, found {found}"
        )

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def next(self, field: str) -> tuple[int, bytes, int]:
        """(tag, content, content offset) of the next TLV."""
        offset = self.base + self.pos
        left = len(self.data) - self.pos
        if left < 2:
            raise self.fail(field, offset, "a DER tag and length", f"{left} bytes left")
        tag, first = self.data[self.pos], self.data[self.pos + 1]
        if tag & 0x1F == 0x1F:
            raise self.fail(field, offset, "a tag number below 31", f"tag 0x{tag:02x}")
        header = 2
        if first == 0x80:
            raise self.fail(field, offset, "a definite length (DER)", "the indefinite form")
        if first > 0x80:
            count = first & 0x7F
            if count > 2 or count > left - 2:
                raise self.fail(field, offset, "a length of at most 2 bytes", f"{count} bytes")
            raw = self.data[self.pos + 2 : self.pos + 2 + count]
            length = int.from_bytes(raw, "big")
            if raw[0] == 0 or length < 0x80:
                raise self.fail(field, offset, "the shortest length form (DER)", raw.hex())
            header += count
        else:
            length = first
        if length > left - header:
            raise self.fail(field, offset, f"{length} content bytes", f"{left - header} bytes left")
        start = self.pos + header
        self.pos = start + length
        return tag, self.data[start : self.pos], self.base + start

    def expect(self, field: str, want: int) -> tuple[bytes, int]:
        offset = self.base + self.pos
        tag, content, at = self.next(field)
        if tag != want:
            raise self.fail(field, offset, f"tag 0x{want:02x}", f"tag 0x{tag:02x}")
        return content, at

    def end(self, what: str) -> None:
        if not self.done:
            raise self.fail(
                what, self.base + self.pos, "no more elements", f"{len(self.data) - self.pos} bytes"
            )


def _oid(content: bytes, at: int, der: _Der) -> str:
    """X.690 8.19: the first subidentifier holds two arcs; base-128, minimal."""
    if not 0 < len(content) <= _MAX_OID:
        raise der.fail("FWID hashAlg", at, f"1 to {_MAX_OID} bytes", f"{len(content)} bytes")
    arcs: list[int] = []
    value = 0
    fresh = True
    for byte in content:
        if fresh and byte == 0x80:
            raise der.fail("FWID hashAlg", at, "minimal subidentifiers (DER)", content.hex())
        value = (value << 7) | (byte & 0x7F)
        fresh = not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    if not fresh:
        raise der.fail("FWID hashAlg", at, "a complete last subidentifier", content.hex())
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, (first, arcs[0] - 40 * first, *arcs[1:])))


def _fwid(content: bytes, at: int, der: _Der, source: str) -> CertificateFwid:
    """FWID ::= SEQUENCE { hashAlg OBJECT IDENTIFIER, digest OCTET STRING }."""
    inner = _Der(content, at, der.where)
    oid_bytes, oid_at = inner.expect("FWID hashAlg", _DER_OID)
    hash_alg = _oid(oid_bytes, oid_at, der)
    digest, digest_at = inner.expect("FWID digest", _DER_OCTET_STRING)
    inner.end("FWID")
    known = _HASHES.get(hash_alg)
    if known is not None and len(digest) != known[1]:
        raise der.fail(
            "FWID digest", digest_at, f"{known[1]} bytes ({known[0]})", f"{len(digest)} bytes"
        )
    if not digest:
        raise der.fail("FWID digest", digest_at, "a digest", "0 bytes")
    return CertificateFwid(hash_alg, digest, source)


def _tcb_info_fwids(content: bytes, at: int, der: _Der, source: str) -> list[CertificateFwid]:
    """DiceTcbInfo's fields (context tags, ascending, each once), its fwids [6] read."""
    fields = _Der(content, at, der.where)
    fwids: list[CertificateFwid] = []
    last = -1
    while not fields.done:
        offset = fields.base + fields.pos
        tag, value, value_at = fields.next("DiceTcbInfo field")
        number = tag & 0x1F
        if tag & 0xC0 != 0x80:
            raise der.fail(
                "DiceTcbInfo field", offset, "a context-specific [n] tag", f"tag 0x{tag:02x}"
            )
        if number <= last:
            raise der.fail(
                "DiceTcbInfo field",
                offset,
                f"fields in ascending tag order, each once (after [{last}])",
                f"[{number}]",
            )
        last = number
        if number != _FWIDS_TAG:
            continue
        if not tag & 0x20:
            raise der.fail("DiceTcbInfo fwids [6]", offset, "constructed (0xa6)", f"0x{tag:02x}")
        items = _Der(value, value_at, der.where)
        while not items.done:
            if len(fwids) == _MAX_FWIDS:
                raise der.fail(
                    "DiceTcbInfo fwids [6]", value_at, f"at most {_MAX_FWIDS} FWIDs", "more"
                )
            fwid, fwid_at = items.expect(f"DiceTcbInfo fwids [6] FWID {len(fwids)}", _DER_SEQUENCE)
            fwids.append(_fwid(fwid, fwid_at, der, source))
        if not fwids:
            raise der.fail("DiceTcbInfo fwids [6]", offset, "SIZE (1..MAX) FWIDs", "none")
    return fwids


def _single_fwids(der: _Der) -> list[CertificateFwid]:
    """2.23.133.5.4.1: a DiceTcbInfo or RIoT's CompositeDeviceID (one SEQUENCE, alone)."""
    content, at = der.expect("extension value", _DER_SEQUENCE)
    der.end("extension value")
    if content[:1] == bytes([_DER_INTEGER]):
        composite = _Der(content, at, der.where)
        version, version_at = composite.expect("CompositeDeviceID version", _DER_INTEGER)
        if not 1 <= len(version) <= 8:
            raise der.fail(
                "CompositeDeviceID version", version_at, "1 to 8 bytes", f"{len(version)} bytes"
            )
        composite.expect("CompositeDeviceID deviceID", _DER_SEQUENCE)
        fwid, fwid_at = composite.expect("CompositeDeviceID fwid", _DER_SEQUENCE)
        composite.end("CompositeDeviceID")
        return [
            _fwid(fwid, fwid_at, der, f"RIoT CompositeDeviceID ({TCG_DICE_TCB_INFO.dotted_string})")
        ]
    return _tcb_info_fwids(
        content, at, der, f"TCG DICE TcbInfo ({TCG_DICE_TCB_INFO.dotted_string})"
    )


def _multi_fwids(der: _Der) -> list[CertificateFwid]:
    """2.23.133.5.4.5: SEQUENCE SIZE (1..MAX) OF DiceTcbInfo."""
    content, at = der.expect("extension value", _DER_SEQUENCE)
    der.end("extension value")
    entries = _Der(content, at, der.where)
    fwids: list[CertificateFwid] = []
    count = 0
    while not entries.done:
        if count == _MAX_TCB_INFOS:
            raise der.fail("DiceTcbInfoSeq", at, f"at most {_MAX_TCB_INFOS} entries", "more")
        entry, entry_at = entries.expect(f"DiceTcbInfoSeq entry {count}", _DER_SEQUENCE)
        source = f"TCG DICE MultiTcbInfo ({TCG_DICE_MULTI_TCB_INFO.dotted_string}) entry {count}"
        fwids += _tcb_info_fwids(entry, entry_at, der, source)
        count += 1
    if not count:
        raise der.fail("DiceTcbInfoSeq", at, "SIZE (1..MAX) DiceTcbInfo", "none")
    return fwids


_READERS = {
    TCG_DICE_TCB_INFO: ("TCG DICE TcbInfo", _single_fwids),
    TCG_DICE_MULTI_TCB_INFO: ("TCG DICE MultiTcbInfo", _multi_fwids),
}


def extension_fwid(
    oid: x509.ObjectIdentifier, value: bytes, *, certificate: str = "the certificate"
) -> CertificateFwid:
    """The first FWID of one DICE extension's DER ``value`` (``oid`` 2.23.133.5.4.1 or
    2.23.133.5.4.5); ``TcbInfoError`` naming ``certificate``, the field and its offset
    when it does not parse or declares none."""
    title, read = _READERS[oid]
    der = _Der(value, 0, f"{certificate} extension {oid.dotted_string} ({title})")
    if len(value) > _MAX_EXTENSION:
        raise der.fail("extension value", 0, f"at most {_MAX_EXTENSION} bytes", str(len(value)))
    fwids = read(der)
    if not fwids:
        raise der.fail("fwids", 0, "an FWID", f"a {title} without one")
    return fwids[0]


def certificate_fwid(cert: x509.Certificate) -> CertificateFwid | None:
    """The FWID ``cert`` (a GPU attestation key's certificate) was issued for: the first
    FWID of its 2.23.133.5.4.1 extension (a DiceTcbInfo's fwids, or RIoT's one), else the
    first FWID of its MultiTcbInfo (2.23.133.5.4.5) entries, in order; nvtrust compares the
    first. None when it has neither extension; ``TcbInfoError`` naming why when the one it
    has does not parse or declares no FWID."""
    name = f"certificate {cert.subject.rfc4514_string()}"
    try:
        extensions = cert.extensions
    except (x509.DuplicateExtension, ValueError) as exc:
        raise TcbInfoError(f"{name}: its extensions do not parse: {exc}") from None
    for oid in _READERS:
        try:
            extension = extensions.get_extension_for_oid(oid)
        except x509.ExtensionNotFound:
            continue
        return extension_fwid(oid, extension.value.public_bytes(), certificate=name)
    return None
