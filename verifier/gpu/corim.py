"""NVIDIA reference values as a signed CoRIM (draft-ietf-rats-corim, the 0.6 draft NVIDIA
follows): CBOR tag 502 around a COSE_Sign1 (RFC 9052 section 4.2, tag 18 optional) whose
payload is a corim-map (tag 501) of CoMIDs (tag 506). ``load_corim`` verifies one and returns
its reference values as a ``Rim`` (format "corim"), like ``rim.load_rim`` does for SWID tags.

Steps (``load_corim``):
 1. Decode boundedly: at most ``MAX_CORIM_BYTES``; a pre-scan walks the CBOR heads without
    recursion (nesting depth <= ``MAX_DEPTH``, item count, definite lengths only, every
    length within the bytes left, only the tags CoRIM uses: cbor2's own semantic tags such
    as shared references (28/29), which make cycles, never reach the decoder); cbor2 then
    decodes with the same depth, no indefinite lengths, no duplicate map keys.
 2. The COSE_Sign1 (RFC 9052 4.2): [protected bstr, unprotected map, payload bstr,
    signature bstr]; protected header: alg (ES256 -7, ES384 -35, ES512 -36), content type
    "application/rim+cbor" when present, corim-meta (label 8, draft-06 5.1) when present,
    no crit label this code does not understand.
 3. The signer: ``signer`` (the operator's certificate, leaf first: NVIDIA names its CoRIM
    signer only by a dependent-rims href and thumbprint) else x5chain (label 33, RFC 9360),
    protected header first. A certificate from the unprotected header is only a candidate
    key: it counts once its chain (4) and the signature (5) verify; no value is read there.
 4. The signer's chain to one of ``roots`` at ``at`` (``rim._verify_chain``: the same
    policies and quirks as for SWID-tag RIM signers).
 5. The signature over Sig_structure ["Signature1", protected, h'', payload] (RFC 9052 4.4)
    with the signer's key (raw r || s, RFC 9053 2.1), the key's curve matching alg.
 6. The payload (signed): corim-map (draft-06 4.1); each dependent-rims thumbprint (4.1.3):
    when any is given, one must be the signer certificate's (SHA-256/384/512 of its DER, or
    of its PEM as NVIDIA's `openssl dgst` of the file computes); rim-validity (4) at ``at``.
 7. Each CoMID (draft-06 5.1): reference-triples [environment-map, [+ measurement-map]];
    measurement-map mkey = the SPDM measurement block index (NVIDIA numbers CoRIM
    measurements by SPDM index, from 1), mval digests [[alg, bytes]] and raw-value (tag
    560): every value is an alternative, all of one size.
 8. Kind, version and product: from the CoRIM id when it is one of NVIDIA's RIM ids
    (NV_GPU_DRIVER_GH100_550.90.07, NV_GPU_VBIOS_1010_0200_882_96005E0001), else from the
    CoMIDs' version-map (mval version) and environment class model.
Errors name the field by its path
(corim.tags[0].triples.reference[2].measurements[0].mval.digests[1]).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from devtrust.verifier.gpu.rim import (
    RimFormatError,
    RimSignatureError,
    _verify_chain,
    load_rim,
    rim_kind,
)
from devtrust.verifier.gpu.types import ReferenceMeasurement, Rim, RimKind

__all__ = [
    "MAX_CORIM_BYTES",
    "CorimFormatError",
    "CorimSignatureError",
    "is_corim",
    "load_any_rim",
    "load_corim",
    "load_corim_file",
]

MAX_CORIM_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 16  # CoRIM's deepest path is ~8 (triples/reference/[env, [mmap{mval{digests}}]])
MAX_ITEMS = 200_000  # CBOR items in one decoded byte string
MAX_CERTIFICATES = 8
MAX_TAGS = 64  # CoMIDs in one CoRIM
MAX_MEASUREMENTS = 4096
MAX_ALTERNATIVES = 64
MAX_SPDM_INDEX = 254  # DSP0274: block indices 1..0xFE

TAG_COSE_SIGN1 = 18
TAG_CORIM = 501  # unsigned corim-map
TAG_SIGNED_CORIM = 502
TAG_COMID = 506
TAG_RAW_VALUE = 560  # tagged-bytes
CONTENT_TYPE = "application/rim+cbor"

# COSE header labels (RFC 9052 3.1, RFC 9360 2) and CoRIM's corim-meta (draft-06 5.1).
_ALG, _CRIT, _CONTENT_TYPE, _KID, _X5CHAIN, _CORIM_META = 1, 2, 3, 4, 33, 8
_UNDERSTOOD = frozenset({_ALG, _CRIT, _CONTENT_TYPE, _KID, _X5CHAIN, _CORIM_META})
# COSE ECDSA (RFC 9053 2.1): alg -> (hash, curve, bytes per coordinate).
_ALGORITHMS: dict[int, tuple[type[hashes.HashAlgorithm], type[ec.EllipticCurve], int, str]] = {
    -7: (hashes.SHA256, ec.SECP256R1, 32, "ES256"),
    -35: (hashes.SHA384, ec.SECP384R1, 48, "ES384"),
    -36: (hashes.SHA512, ec.SECP521R1, 66, "ES512"),
}
# Named Information hash algorithm ids (IANA, what CoRIM's digest uses) and names.
_DIGESTS: dict[int | str, tuple[str, int]] = {
    1: ("sha-256", 32),
    7: ("sha-384", 48),
    8: ("sha-512", 64),
    "sha-256": ("sha-256", 32),
    "sha-384": ("sha-384", 48),
    "sha-512": ("sha-512", 64),
}
# Tags a CoRIM carries (draft-06 and RFC 9090/9562 types it uses). Anything else, and
# notably cbor2's semantic tags with side effects (shared references 28/29, regular
# expressions 35, string references 25/256, decimal fractions 4/5), is refused unread.
_ALLOWED_TAGS = frozenset(
    {1, TAG_COSE_SIGN1, 32, 37, 111, 112, TAG_CORIM, TAG_SIGNED_CORIM, 505, TAG_COMID, 508}
    | set(range(550, 564))
)

# Hopper: NV_GPU_DRIVER_GH100_<version>; Blackwell: NV_GPU_CC_DRIVER_GB100_<version>.
_DRIVER_ID = re.compile(r"NV_GPU_(?:CC_)?DRIVER_([A-Za-z0-9]+)_([0-9]+(?:\.[0-9]+)+)")
_VBIOS_ID = re.compile(
    r"NV_GPU_(?:CC_)?VBIOS_([0-9A-Fa-f]{4}_[0-9A-Fa-f]{4}_[0-9A-Fa-f]{3})_([0-9A-Fa-f]{10})"
)

# The same bases as the SWID-tag loader's: callers catch RimFormatError / RimSignatureError.
CorimFormatError = RimFormatError
CorimSignatureError = RimSignatureError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _what(source: str) -> str:
    return f"CoRIM {source}" if source else "CoRIM"


def _found(value: Any) -> str:
    """A short, safe description of a decoded value for an error message."""
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)}"
    if isinstance(value, Mapping):
        return f"a map of {len(value)}"
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


class _Fields:
    """Error messages for one CoRIM: ``fail(path, expected, value)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, expected: str, found: str) -> RimFormatError:
        return RimFormatError(f"{_what(self.source)}: {path}: expected {expected}, found {found}")

    def bad(self, path: str, expected: str, value: Any) -> RimFormatError:
        return self.fail(path, expected, _found(value))

    def map(self, value: Any, path: str) -> dict[Any, Any]:
        if not isinstance(value, Mapping):  # cbor2 gives frozendicts inside tags
            raise self.bad(path, "a map", value)
        return dict(value)

    def array(
        self, value: Any, path: str, *, low: int = 0, high: int = MAX_MEASUREMENTS
    ) -> list[Any]:
        if not isinstance(value, (list, tuple)):  # cbor2 gives tuples inside tags
            raise self.bad(path, "an array", value)
        if not low <= len(value) <= high:
            raise self.fail(path, f"an array of {low} to {high} items", f"{len(value)} items")
        return list(value)

    def bytes_(self, value: Any, path: str) -> bytes:
        if not isinstance(value, bytes):
            raise self.bad(path, "a byte string", value)
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.bad(path, "a text string", value)
        return value

    def tagged(self, value: Any, tag: int, path: str) -> Any:
        if not isinstance(value, cbor2.CBORTag) or value.tag != tag:
            raise self.bad(path, f"CBOR tag {tag}", value)
        return value.value

    def required(self, mapping: dict[Any, Any], key: int, path: str, name: str) -> Any:
        if key not in mapping:
            raise self.fail(f"{path}.{name}", f"a value (key {key})", "none")
        return mapping[key]


# -- 1. bounded decoding ----------------------------------------------------------------


def _head(data: bytes, start: int, path: str, fields: _Fields) -> tuple[int, int, int]:
    """The data item head at ``start`` (RFC 8949 3): (major type, argument, end of head)."""
    major, info = data[start] >> 5, data[start] & 0x1F
    pos = start + 1
    if info < 24:
        return major, info, pos
    if info <= 27:
        width = 1 << (info - 24)
        if pos + width > len(data):
            raise fields.fail(path, "well-formed CBOR", f"the data ends at byte {len(data)}")
        return major, int.from_bytes(data[pos : pos + width], "big"), pos + width
    if info == 31:
        raise fields.fail(path, "definite lengths only", f"an indefinite length at byte {start}")
    raise fields.fail(path, "well-formed CBOR", f"reserved value {info} at byte {start}")


def _item(data: bytes, start: int, path: str, fields: _Fields) -> tuple[int, int]:
    """The item at ``start``: (items it encloses, where its own bytes end)."""
    major, arg, pos = _head(data, start, path, fields)
    left = len(data) - pos
    if major in (2, 3):  # byte / text string: skip its content
        if arg > left:
            raise fields.fail(
                path, "well-formed CBOR", f"a string of {arg} bytes at byte {start}, {left} left"
            )
        return 0, pos + arg
    if major in (4, 5):  # array / map (a map's pairs are two items)
        owed = arg * (2 if major == 5 else 1)
        if owed > left:  # each item takes at least one byte
            raise fields.fail(
                path, "well-formed CBOR", f"{owed} items at byte {start}, {left} bytes left"
            )
        return owed, pos
    if major == 6:  # tag: one item follows
        if arg not in _ALLOWED_TAGS:
            raise fields.fail(path, "only the CBOR tags CoRIM uses", f"tag {arg} at byte {start}")
        return 1, pos
    return 0, pos  # integers, simple values, floats


def _prescan(data: bytes, path: str, fields: _Fields) -> None:
    """Walk the CBOR data items' heads (RFC 8949 3) without recursion: one top-level item,
    definite lengths, each length within the bytes left, depth <= MAX_DEPTH, items <=
    MAX_ITEMS, tags among ``_ALLOWED_TAGS``. Byte string contents are not entered (nested
    CBOR is decoded, and pre-scanned, on its own)."""
    pos, items = 0, 0
    stack: list[int] = []  # items still owed by each open container or tag
    while True:
        if pos >= len(data):
            raise fields.fail(path, "well-formed CBOR", f"the data ends at byte {pos}")
        items += 1
        if items > MAX_ITEMS:
            raise fields.fail(path, f"at most {MAX_ITEMS} CBOR items", "more")
        start = pos
        owed, pos = _item(data, start, path, fields)
        if owed:
            stack.append(owed)
            if len(stack) > MAX_DEPTH:
                raise fields.fail(
                    path, f"nesting at most {MAX_DEPTH} deep", f"deeper at byte {start}"
                )
            continue
        while stack:  # this item completes its container, which may complete its own
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
        if not stack:
            break
    if pos != len(data):
        raise fields.fail(path, "one CBOR item", f"{len(data) - pos} bytes after it")


def _decode(data: bytes, path: str, fields: _Fields) -> Any:
    _prescan(data, path, fields)
    try:
        return cbor2.loads(
            data,
            max_depth=MAX_DEPTH + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except (cbor2.CBORError, ValueError, TypeError, OverflowError) as exc:
        raise fields.fail(path, "well-formed CBOR", str(exc)[:200]) from None


# -- 2. to 5. COSE_Sign1 ----------------------------------------------------------------


def _cose(
    data: bytes, fields: _Fields
) -> tuple[bytes, dict[Any, Any], dict[Any, Any], bytes, bytes]:
    """Step 2: (protected bytes, protected map, unprotected map, payload, signature)."""
    top = _decode(data, "corim", fields)
    if isinstance(top, cbor2.CBORTag) and top.tag == TAG_CORIM:
        raise fields.fail("corim", "a signed CoRIM (tag 502)", "an unsigned CoRIM (tag 501)")
    inner = fields.tagged(top, TAG_SIGNED_CORIM, "corim")
    if isinstance(inner, cbor2.CBORTag):
        inner = fields.tagged(inner, TAG_COSE_SIGN1, "corim.COSE_Sign1")
    sign1 = fields.array(inner, "corim.COSE_Sign1", low=4, high=4)
    protected_bytes = fields.bytes_(sign1[0], "corim.COSE_Sign1.protected")
    unprotected = fields.map(sign1[1], "corim.COSE_Sign1.unprotected")
    payload = fields.bytes_(sign1[2], "corim.COSE_Sign1.payload")  # nil: detached, refused
    signature = fields.bytes_(sign1[3], "corim.COSE_Sign1.signature")
    protected = fields.map(
        _decode(protected_bytes, "corim.COSE_Sign1.protected", fields) if protected_bytes else {},
        "corim.COSE_Sign1.protected",
    )
    return protected_bytes, protected, unprotected, payload, signature


def _header(protected: dict[Any, Any], fields: _Fields) -> int:
    """Step 2: the protected header's alg; content type and corim-meta checked when present."""
    path = "corim.COSE_Sign1.protected"
    alg = fields.required(protected, _ALG, path, "alg")
    if not _is_int(alg) or alg not in _ALGORITHMS:
        raise fields.bad(f"{path}.alg", "ES256 (-7), ES384 (-35) or ES512 (-36)", alg)
    if _CONTENT_TYPE in protected and protected[_CONTENT_TYPE] != CONTENT_TYPE:
        raise fields.bad(f"{path}.content-type", repr(CONTENT_TYPE), protected[_CONTENT_TYPE])
    if _CRIT in protected:
        crit = fields.array(protected[_CRIT], f"{path}.crit", low=1, high=16)
        unknown = [label for label in crit if not _is_int(label) or label not in _UNDERSTOOD]
        if unknown:
            raise fields.bad(f"{path}.crit", "only labels this verifier understands", unknown)
    if _CORIM_META in protected:
        meta_bytes = fields.bytes_(protected[_CORIM_META], f"{path}.corim-meta")
        meta = fields.map(_decode(meta_bytes, f"{path}.corim-meta", fields), f"{path}.corim-meta")
        signer = fields.map(
            fields.required(meta, 0, f"{path}.corim-meta", "signer"), f"{path}.corim-meta.signer"
        )
        fields.text(
            fields.required(signer, 0, f"{path}.corim-meta.signer", "signer-name"),
            f"{path}.corim-meta.signer.signer-name",
        )
    return int(alg)


def _x5chain(
    protected: dict[Any, Any], unprotected: dict[Any, Any], fields: _Fields
) -> list[x509.Certificate]:
    """Step 3: the certificates of x5chain (leaf first), protected header first."""
    where = "protected" if _X5CHAIN in protected else "unprotected"
    value = (protected if where == "protected" else unprotected).get(_X5CHAIN)
    path = f"corim.COSE_Sign1.{where}.x5chain"
    if value is None:
        raise RimSignatureError(
            f"{_what(fields.source)}: no signer certificate: the CoRIM has no x5chain (COSE "
            "header 33); NVIDIA names its CoRIM signer by the dependent-rims href: give that "
            "certificate (PEM) as the signer (--signer FILE)"
        )
    ders = (
        [value]
        if isinstance(value, bytes)
        else fields.array(value, path, low=1, high=MAX_CERTIFICATES)
    )
    certs = []
    for n, der in enumerate(ders):
        data = fields.bytes_(der, f"{path}[{n}]")
        try:
            certs.append(x509.load_der_x509_certificate(data))
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
            raise fields.fail(f"{path}[{n}]", "a DER certificate", str(exc)[:200]) from None
    return certs


def _parsed(certs: Sequence[x509.Certificate], what: str, fields: _Fields) -> None:
    """Each certificate's fields parse (cryptography parses some lazily, on first use, and
    the chain check and messages use them): else a format error naming which."""
    for n, cert in enumerate(certs):
        try:
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            _ = cert.not_valid_before_utc, cert.not_valid_after_utc, len(cert.extensions)
            cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise fields.fail(
                f"{what}[{n}]", "a certificate whose fields parse", str(exc)[:200]
            ) from None


def _verify_signature(
    alg: int,
    leaf: x509.Certificate,
    *,
    protected_bytes: bytes,
    payload: bytes,
    signature: bytes,
    fields: _Fields,
) -> None:
    """Step 5: ECDSA over the Sig_structure (RFC 9052 4.4) with the verified signer's key."""
    digest, curve, size, name = _ALGORITHMS[alg]
    who = f"{_what(fields.source)}: signer {leaf.subject.rfc4514_string()}"
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
        raise RimSignatureError(
            f"{who}: expected a {curve.name} key for {name}, found "
            f"{getattr(getattr(key, 'curve', None), 'name', type(key).__name__)}"
        )
    if len(signature) != 2 * size:
        raise RimSignatureError(
            f"{who}: expected a {2 * size}-byte {name} signature (r || s), found "
            f"{len(signature)} bytes"
        )
    to_be_signed = cbor2.dumps(["Signature1", protected_bytes, b"", payload])
    der = encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    try:
        key.verify(der, to_be_signed, ec.ECDSA(digest()))
    except InvalidSignature:
        raise RimSignatureError(
            f"{who}: expected a valid {name} signature over the protected header and payload, "
            "found one that does not verify (the CoRIM was changed or signed by another key)"
        ) from None


# -- 6. corim-map -----------------------------------------------------------------------


def _digest(value: Any, path: str, fields: _Fields) -> tuple[str, bytes]:
    pair = fields.array(value, path, low=2, high=2)
    alg = pair[0]
    if not (_is_int(alg) or isinstance(alg, str)) or alg not in _DIGESTS:
        raise fields.bad(f"{path}[0]", "sha-256 (1), sha-384 (7) or sha-512 (8)", alg)
    name, size = _DIGESTS[alg]
    data = fields.bytes_(pair[1], f"{path}[1]")
    if len(data) != size:
        raise fields.fail(f"{path}[1]", f"{size} bytes ({name})", f"{len(data)} bytes")
    return name, data


def _thumbprints(corim: dict[Any, Any], leaf: x509.Certificate, fields: _Fields) -> None:
    """Step 6: when dependent-rims carries thumbprints, one must be the signer's."""
    if 2 not in corim:
        return
    locators = fields.array(corim[2], "corim.dependent-rims", low=1, high=MAX_TAGS)
    given: list[tuple[str, bytes]] = []
    for n, locator in enumerate(locators):
        path = f"corim.dependent-rims[{n}]"
        entry = fields.map(locator, path)
        fields.required(entry, 0, path, "href")
        if 1 not in entry:
            continue
        thumb = fields.array(entry[1], f"{path}.thumbprint", low=1, high=8)
        if isinstance(thumb[0], (list, tuple)):  # [+ digest]
            given += [_digest(d, f"{path}.thumbprint[{i}]", fields) for i, d in enumerate(thumb)]
        else:
            given.append(_digest(thumb, f"{path}.thumbprint", fields))
    if not given:
        return
    encodings = (
        leaf.public_bytes(serialization.Encoding.DER),
        leaf.public_bytes(serialization.Encoding.PEM),
    )
    for name, value in given:
        if any(hashlib.new(name.replace("-", ""), e).digest() == value for e in encodings):
            return
    mine = hashlib.sha256(encodings[0]).hexdigest()
    raise RimSignatureError(
        f"{_what(fields.source)}: corim.dependent-rims: expected a thumbprint of the signer "
        f"{leaf.subject.rfc4514_string()} (sha-256 of its DER {mine}), found "
        + ", ".join(f"{name} {value.hex()}" for name, value in given)
    )


def _validity(corim: dict[Any, Any], at: datetime, fields: _Fields) -> None:
    """Step 6: rim-validity {? 0: not-before, 1: not-after} (epoch-based times)."""
    if 4 not in corim:
        return
    validity = fields.map(corim[4], "corim.rim-validity")
    bounds: dict[int, datetime] = {}
    for key, name in ((0, "not-before"), (1, "not-after")):
        if key not in validity:
            continue
        value = validity[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = datetime.fromtimestamp(value, UTC)
        if not isinstance(value, datetime):
            raise fields.bad(f"corim.rim-validity.{name}", "a time (tag 1)", value)
        bounds[key] = value if value.tzinfo else value.replace(tzinfo=UTC)
    if (0 in bounds and at < bounds[0]) or (1 in bounds and at > bounds[1]):
        raise RimSignatureError(
            f"{_what(fields.source)}: corim.rim-validity: expected {at.isoformat()} within "
            f"{bounds.get(0, '-')} to {bounds.get(1, '-')}; a CoRIM recorded earlier is checked "
            "with --at set to a time within that window"
        )


# -- 7. CoMIDs --------------------------------------------------------------------------


class _Reading:
    """What the CoMIDs say, gathered across them."""

    def __init__(self) -> None:
        self.measurements: dict[int, ReferenceMeasurement] = {}
        self.versions: set[str] = set()
        self.models: set[str] = set()


def _values(mval: dict[Any, Any], path: str, fields: _Fields) -> list[bytes]:
    values: list[bytes] = []
    if 2 in mval:
        digests = fields.array(mval[2], f"{path}.digests", low=1, high=MAX_ALTERNATIVES)
        values += [_digest(d, f"{path}.digests[{n}]", fields)[1] for n, d in enumerate(digests)]
    if 5 in mval:
        raise fields.fail(
            f"{path}.raw-value-mask", "no mask (masked raw values are not compared)", "one"
        )
    if 4 in mval:
        raw = mval[4]
        raw = raw.value if isinstance(raw, cbor2.CBORTag) and raw.tag == TAG_RAW_VALUE else raw
        values.append(fields.bytes_(raw, f"{path}.raw-value"))
    if values and len({len(v) for v in values}) != 1:
        raise fields.fail(
            path, "values of one size", "sizes " + ", ".join(str(len(v)) for v in values)
        )
    if len(values) > MAX_ALTERNATIVES:
        raise fields.fail(path, f"at most {MAX_ALTERNATIVES} values", str(len(values)))
    return values


def _measurement(item: Any, path: str, reading: _Reading, fields: _Fields) -> None:
    mmap = fields.map(item, path)
    mval = fields.map(fields.required(mmap, 1, path, "mval"), f"{path}.mval")
    if 0 in mval:  # version-map {0: version, ? 1: version-scheme}
        version = fields.map(mval[0], f"{path}.mval.version")
        reading.versions.add(
            fields.text(
                fields.required(version, 0, f"{path}.mval.version", "version"),
                f"{path}.mval.version.version",
            ).strip()
        )
    values = _values(mval, f"{path}.mval", fields)
    if 0 not in mmap:
        if values:
            raise fields.fail(f"{path}.mkey", "the SPDM measurement index of these values", "none")
        return
    index = mmap[0]
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= MAX_SPDM_INDEX:
        raise fields.bad(f"{path}.mkey", f"an SPDM measurement index 1 to {MAX_SPDM_INDEX}", index)
    if not values:
        raise fields.fail(f"{path}.mval", "digests or a raw-value", "neither")
    if index in reading.measurements:
        raise fields.fail(
            f"{path}.mkey", "each SPDM index once in the CoRIM", f"index {index} again"
        )
    if len(reading.measurements) >= MAX_MEASUREMENTS:
        raise fields.fail(path, f"at most {MAX_MEASUREMENTS} measurements", "more")
    reading.measurements[index] = ReferenceMeasurement(index, tuple(values), len(values[0]))


def _comid(tag: Any, path: str, reading: _Reading, fields: _Fields) -> None:
    data = fields.bytes_(fields.tagged(tag, TAG_COMID, path), path)
    comid = fields.map(_decode(data, path, fields), path)
    identity = fields.map(fields.required(comid, 1, path, "tag-identity"), f"{path}.tag-identity")
    fields.required(identity, 0, f"{path}.tag-identity", "tag-id")
    triples = fields.map(fields.required(comid, 4, path, "triples"), f"{path}.triples")
    references = fields.array(
        fields.required(triples, 0, f"{path}.triples", "reference"),
        f"{path}.triples.reference",
        low=1,
    )
    for n, triple in enumerate(references):
        tpath = f"{path}.triples.reference[{n}]"
        pair = fields.array(triple, tpath, low=2, high=2)
        environment = fields.map(pair[0], f"{tpath}.environment")
        if 0 in environment:
            klass = fields.map(environment[0], f"{tpath}.environment.class")
            if 2 in klass:
                reading.models.add(
                    fields.text(klass[2], f"{tpath}.environment.class.model").strip()
                )
        for m, item in enumerate(fields.array(pair[1], f"{tpath}.measurements", low=1)):
            _measurement(item, f"{tpath}.measurements[{m}]", reading, fields)


# -- 8. kind, version, product ----------------------------------------------------------


def _identify(corim_id: str, reading: _Reading, fields: _Fields) -> tuple[RimKind, str, str]:
    model = next(iter(reading.models)) if len(reading.models) == 1 else ""
    if len(reading.models) > 1:
        raise fields.fail(
            "corim.tags", "one environment class model", ", ".join(sorted(reading.models))
        )
    if match := _DRIVER_ID.fullmatch(corim_id):
        kind, version, product = RimKind.DRIVER, match.group(2), match.group(1)
    elif match := _VBIOS_ID.fullmatch(corim_id):
        hexes = match.group(2).upper()
        version = ".".join(hexes[i : i + 2] for i in range(0, 10, 2))
        kind, product = RimKind.VBIOS, model
    else:
        if len(reading.versions) != 1:
            raise fields.fail(
                "corim.id",
                "an NVIDIA RIM id (NV_GPU_DRIVER_<product>_<version>, NV_GPU_VBIOS_<project>_"
                "<sku>_<chip>_<10 hex digits>) or one version in the CoMIDs' mval version",
                f"{corim_id[:80]!r} and versions {sorted(reading.versions)}",
            )
        version = next(iter(reading.versions))
        kind, product = rim_kind(version, source=fields.source), model
        return kind, version, product
    others = {v for v in reading.versions if v.lower() != version.lower()}
    if others:
        raise fields.fail(
            "corim.tags", f"mval versions equal to the id's {version}", ", ".join(sorted(others))
        )
    return kind, version, product or model


# -- the loader -------------------------------------------------------------------------


def is_corim(data: bytes) -> bool:
    """Whether ``data`` looks like CBOR rather than XML (the first non-blank byte is not
    '<'): how a RIM file is sent to ``load_corim`` or ``rim.load_rim``."""
    head = bytes(data[:64]).lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"<")


def load_corim(
    data: bytes,
    *,
    roots: Sequence[x509.Certificate],
    at: datetime,
    signer: Sequence[x509.Certificate] = (),
    source: str = "",
) -> Rim:
    """Verify a signed CoRIM (signer chain to one of ``roots`` at ``at``, then its COSE
    signature) and return its reference values. ``signer``: the signer's certificate, leaf
    first (then intermediates), when the CoRIM does not carry it (x5chain). Errors as
    ``rim.load_rim``'s: ``RimFormatError`` naming the field's path, ``RimSignatureError``."""
    if at.tzinfo is None:
        raise ValueError("load_corim: `at` must be timezone-aware")
    fields = _Fields(source)
    data = bytes(data)
    if len(data) > MAX_CORIM_BYTES:
        raise fields.fail("corim", f"at most {MAX_CORIM_BYTES} bytes", f"{len(data)} bytes")
    # 2. COSE_Sign1 and its protected header.
    protected_bytes, protected, unprotected, payload, signature = _cose(data, fields)
    alg = _header(protected, fields)
    # 3., 4. The signer and its chain.
    certs = list(signer) if signer else _x5chain(protected, unprotected, fields)
    if not certs or len(certs) > MAX_CERTIFICATES:
        raise fields.fail("signer", f"1 to {MAX_CERTIFICATES} certificates", str(len(certs)))
    _parsed(certs, "signer" if signer else "corim.COSE_Sign1.x5chain", fields)
    leaf = _verify_chain(certs, roots, at, source)
    # 5. The signature; only now is anything in the payload read.
    _verify_signature(
        alg,
        leaf,
        protected_bytes=protected_bytes,
        payload=payload,
        signature=signature,
        fields=fields,
    )
    # 6. corim-map.
    corim = fields.map(
        fields.tagged(_decode(payload, "corim.payload", fields), TAG_CORIM, "corim.payload"),
        "corim.payload",
    )
    raw_id = fields.required(corim, 0, "corim", "id")
    if isinstance(raw_id, uuid.UUID):
        corim_id = str(raw_id)
    else:
        corim_id = fields.text(raw_id, "corim.id").strip()
    _thumbprints(corim, leaf, fields)
    _validity(corim, at, fields)
    # 7. The CoMIDs.
    tags = fields.array(
        fields.required(corim, 1, "corim", "tags"), "corim.tags", low=1, high=MAX_TAGS
    )
    reading = _Reading()
    for n, tag in enumerate(tags):
        _comid(tag, f"corim.tags[{n}]", reading, fields)
    if not reading.measurements:
        raise fields.fail("corim.tags", "at least one reference measurement", "none")
    # 8. What it is for.
    kind, version, product = _identify(corim_id, reading, fields)
    return Rim(
        kind=kind,
        version=version,
        product=product,
        tag_id=corim_id,
        measurements=tuple(sorted(reading.measurements.values(), key=lambda m: m.index)),
        signer=leaf.subject.rfc4514_string(),
        source=source,
        format="corim",
    )


def load_any_rim(
    data: bytes,
    *,
    roots: Sequence[x509.Certificate],
    at: datetime,
    signer: Sequence[x509.Certificate] = (),
    source: str = "",
) -> Rim:
    """A RIM in either of NVIDIA's formats: a TCG RIM SWID tag (XML: ``rim.load_rim``, whose
    signer chain is in its KeyInfo: ``signer`` is not used) or a signed CoRIM (CBOR:
    ``load_corim``). What ``devtrust gpu rim add`` and ``gpu check --rim`` read."""
    if is_corim(data):
        return load_corim(data, roots=roots, at=at, signer=signer, source=source)
    return load_rim(data, roots=roots, at=at, source=source)


def load_corim_file(
    path: Path,
    *,
    roots: Sequence[x509.Certificate],
    at: datetime,
    signer: Sequence[x509.Certificate] = (),
) -> Rim:
    """``load_corim`` of a file, reading at most ``MAX_CORIM_BYTES`` + 1 bytes."""
    with path.open("rb") as handle:
        data = handle.read(MAX_CORIM_BYTES + 1)
    return load_corim(data, roots=roots, at=at, signer=signer, source=str(path))
