"""NVIDIA reference integrity manifests (RIMs): TCG RIM SWID tags (ISO/IEC 19770-2:2015)
signed with an enveloped XML signature (W3C XML-DSig 1.1, C14N 1.1, ecdsa-sha384), as
NVIDIA publishes them for each GPU driver and VBIOS version. ``load_rim`` verifies one and
returns its golden values as a ``Rim``; no I/O but ``load_rim_file``'s read.

Steps (``load_rim``):
 1. Parse safely: at most ``MAX_RIM_BYTES``; no DOCTYPE, no entities, no network, no huge
    trees (lxml/libxml2's limits stay on).
 2. Take the signer's certificates from the one ds:Signature's KeyInfo/X509Data (leaf first).
 3. Verify leaf -> one of ``roots`` at ``at`` with cryptography's x509 verification.
    Quirks accepted (NVIDIA): the RIM signer ("HCC RIM L4 Signer") has no subjectAltName
    and no extendedKeyUsage, so the end-entity policy is not web PKI's: it requires keyUsage
    digitalSignature instead (``_EE_POLICY``); and two RIM CAs write validity dates as
    GeneralizedTime where RFC 5280 wants UTCTime, which cryptography refuses: that one
    refusal sends the path to ``_walk_chain``, which makes the same checks by hand.
 4. Verify the XML signature with signxml against the verified leaf only (never a key the
    document names on its own): one Reference, ecdsa-sha384 over SHA-384 digests.
 5. Read every value (Meta colloquialVersion and product, tagId, the Payload's Resources)
    only from what the signature covers (signxml's ``signed_xml``), never from the parsed
    input: a second, unsigned Payload or a moved signed element is never read
    (signature-wrapping defence).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from lxml import etree
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.exceptions import SignXMLException
from signxml.verifier import SignatureConfiguration, XMLVerifier

from devtrust.verifier.errors import MalformedInput, Rejected
from devtrust.verifier.gpu.types import ReferenceMeasurement, Rim, RimKind, same_version

__all__ = [
    "MAX_RIM_BYTES",
    "FileRims",
    "RimFormatError",
    "RimSignatureError",
    "load_rim",
    "load_rim_file",
    "rim_kind",
]

MAX_RIM_BYTES = 4 * 1024 * 1024  # NVIDIA's RIMs are ~20 KiB
MAX_CERTIFICATES = 8  # in KeyInfo; NVIDIA's carry 4 (signer, L3, GH100 CA, root)
MAX_RESOURCES = 4096  # Resources in the Payload; NVIDIA's carry 64
MAX_ALTERNATIVES = 64  # golden values per measurement
SHA384_SIZE = 48

SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
# The Hash0..HashN-1 attributes of a Resource live in the digest algorithm's namespace.
SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"

_VBIOS_VERSION = re.compile(r"[0-9A-Fa-f]{2}(\.[0-9A-Fa-f]{2}){4}")
_DRIVER_VERSION = re.compile(r"[0-9]+(\.[0-9]+)+")
_DECIMAL = re.compile(r"[0-9]{1,9}")  # ASCII digits only (str.isdigit takes "²")
_HEX = re.compile(r"([0-9A-Fa-f]{2})*")  # no spaces (bytes.fromhex skips them)


class RimFormatError(MalformedInput):
    """Bytes that are not a RIM this verifier reads (the message names the file and field)."""


class RimSignatureError(Rejected):
    """The RIM's certificate chain or its XML signature does not verify."""


def _must_be_ca(policy: object, cert: x509.Certificate, ext: x509.BasicConstraints | None) -> None:
    if ext is None or not ext.ca:
        raise ValueError(f"{cert.subject.rfc4514_string()} is not a CA (basicConstraints)")


def _key_cert_sign(policy: object, cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError(f"{cert.subject.rfc4514_string()} lacks keyCertSign")


def _digital_signature(policy: object, cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    if ext is None or not ext.digital_signature:
        raise ValueError(f"{cert.subject.rfc4514_string()} lacks keyUsage digitalSignature")


def _not_a_ca(policy: object, cert: x509.Certificate, ext: x509.BasicConstraints | None) -> None:
    if ext is not None and ext.ca:
        raise ValueError(f"{cert.subject.rfc4514_string()} is a CA, not a RIM signer")


# NVIDIA's RIM issuers (L3, GH100 CA, CoRIM root): CAs by basicConstraints, keyCertSign.
_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _must_be_ca)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _key_cert_sign)
)
# NVIDIA's RIM signer: no SAN, no EKU (web PKI's client policy requires a SAN); it must be
# allowed to sign (keyUsage digitalSignature, critical in NVIDIA's) and must not be a CA.
_EE_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _digital_signature)
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _not_a_ca)
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
)


def _expect(at: datetime) -> SignatureConfiguration:
    """What NVIDIA's RIM signatures are, and nothing else (signxml then also requires the
    X.509 certificate it is given, checks its validity at ``at`` and KeyValue agreement)."""
    return SignatureConfiguration(
        location="./",  # the signature is a child of SoftwareIdentity (enveloped)
        expect_references=1,  # one Reference; step 5 checks it covers the whole document
        signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
        verification_time=at,
    )


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
    )


def _what(source: str) -> str:
    return f"RIM {source}" if source else "RIM"


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rim_kind(version: str, *, source: str = "") -> RimKind:
    """VBIOS when ``version`` is five dot-separated pairs of hex digits (96.00.5E.00.01),
    driver when digits and dots (545.00, 550.90.07); anything else is not a RIM we read."""
    if _VBIOS_VERSION.fullmatch(version):
        return RimKind.VBIOS
    if _DRIVER_VERSION.fullmatch(version):
        return RimKind.DRIVER
    raise RimFormatError(
        f"{_what(source)}: Meta colloquialVersion: expected a driver version (545.00) or a "
        f"VBIOS version (96.00.5E.00.01), found {version[:64]!r}"
    )


def _parse(data: bytes, source: str) -> Any:
    """Step 1: the document's root element, parsed without DTDs, entities or network."""
    what = _what(source)
    if len(data) > MAX_RIM_BYTES:
        raise RimFormatError(f"{what}: expected at most {MAX_RIM_BYTES} bytes, found {len(data)}")
    upper = data.upper()
    if b"<!DOCTYPE" in upper or b"<!ENTITY" in upper:
        raise RimFormatError(f"{what}: expected no DOCTYPE or ENTITY declaration, found one")
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise RimFormatError(f"{what}: expected well-formed XML, found: {exc}") from None
    # Without a DTD, an entity reference is a well-formedness error (no Entity nodes).
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:  # another encoding hid it above
        raise RimFormatError(f"{what}: expected no DOCTYPE declaration, found one")
    if root.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise RimFormatError(
            f"{what}: root element: expected SoftwareIdentity in {SWID_NS}, found {root.tag}"
        )
    return root


def _certificates(root: Any, source: str) -> list[x509.Certificate]:
    """Step 2: the KeyInfo certificates of the one signature, as the document orders them."""
    what = _what(source)
    signatures = list(root.iter(f"{{{DSIG_NS}}}Signature"))
    if len(signatures) != 1 or signatures[0].getparent() is not root:
        raise RimFormatError(
            f"{what}: expected one ds:Signature, a child of SoftwareIdentity, found "
            f"{len(signatures)}" + ("" if len(signatures) != 1 else " elsewhere")
        )
    texts = signatures[0].findall(
        f"{{{DSIG_NS}}}KeyInfo/{{{DSIG_NS}}}X509Data/{{{DSIG_NS}}}X509Certificate"
    )
    if not texts or len(texts) > MAX_CERTIFICATES:
        raise RimFormatError(
            f"{what}: KeyInfo/X509Data: expected 1 to {MAX_CERTIFICATES} X509Certificate, "
            f"found {len(texts)}"
        )
    certs = []
    for n, element in enumerate(texts):
        try:
            der = base64.b64decode("".join((element.text or "").split()), validate=True)
            cert = x509.load_der_x509_certificate(der)
            # cryptography parses some fields on first use: the chain check and its
            # messages read these, so a malformed one is named here, not raised there.
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            _ = cert.not_valid_before_utc, cert.not_valid_after_utc, len(cert.extensions)
            cert.public_key()
            certs.append(cert)
        except (binascii.Error, ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
            raise RimFormatError(
                f"{what}: KeyInfo X509Certificate {n}: expected a base64 DER certificate, "
                f"found: {exc}"
            ) from None
    return certs


def _verify_chain(
    certs: list[x509.Certificate], roots: Sequence[x509.Certificate], at: datetime, source: str
) -> x509.Certificate:
    """Step 3: leaf (the first certificate) -> a root, at ``at``; returns the leaf."""
    what = _what(source)
    leaf = certs[0]
    if not roots:
        raise RimSignatureError(f"{what}: signer {_name(leaf)}: no RIM root to verify against")
    path_certs = [leaf, *(cert for cert in certs[1:] if cert not in roots)]
    for cert in path_certs:  # the common failure of a recorded RIM: name it plainly
        if at > cert.not_valid_after_utc or at < cert.not_valid_before_utc:
            state = "expired" if at > cert.not_valid_after_utc else "not yet valid"
            raise RimSignatureError(
                f"{what}: signer {_name(leaf)}: certificate {_name(cert)} is {state} at "
                f"{_utc(at)} (valid {_utc(cert.not_valid_before_utc)} to "
                f"{_utc(cert.not_valid_after_utc)}); a RIM recorded earlier is checked with "
                f"--at set to a time within that window"
            )
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(at)
        .max_chain_depth(len(certs) + 1)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, path_certs[1:])
    except VerificationError as exc:
        reason = str(exc)
        if _GENERALIZED_TIME_REFUSAL in reason:
            reason = _walk_chain(path_certs, roots, at)
        if reason:
            raise RimSignatureError(
                f"{what}: signer {_name(leaf)}: expected a certificate path to a RIM root ("
                + "; ".join(_name(root) for root in roots)
                + f") at {_utc(at)}, found: {reason}"
            ) from None
    return leaf


# Quirk accepted (NVIDIA): the RIM CAs "NVIDIA Reference Value GH100 CA" and "... L3 GH100
# 001" encode validity dates before 2050 as GeneralizedTime, where RFC 5280 4.1.2.5 says
# UTCTime. cryptography's path builder refuses such a certificate and has no policy switch
# for it; OpenSSL (nvtrust's verifier) accepts it. Only when that is the refusal, the path is
# walked here with the same checks the policies above make, and nothing else is relaxed.
_GENERALIZED_TIME_REFUSAL = "must be UtcTime"
_KNOWN_CRITICAL = frozenset(
    {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.SubjectAlternativeName.oid,
        x509.ExtendedKeyUsage.oid,
        x509.CertificatePolicies.oid,
        x509.NameConstraints.oid,
        x509.PolicyConstraints.oid,
    }
)


def _extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _walk_chain(
    path_certs: list[x509.Certificate], roots: Sequence[x509.Certificate], at: datetime
) -> str:
    """The RFC 5280 6.1 path from the leaf to a root for the GeneralizedTime quirk; "" when
    it verifies, else why not. Steps: 1. each certificate's issuer found by name and
    signature (``verify_directly_issued_by``), ending at one of ``roots``; 2. each
    certificate (root included) valid at ``at``, with no critical extension this code does
    not check (NameConstraints and PolicyConstraints are refused when present); 3. the leaf
    as ``_EE_POLICY``; 4. each issuer as ``_CA_POLICY`` and within its pathLenConstraint."""
    path = [path_certs[0]]
    while True:
        current = path[-1]
        anchor = next((r for r in roots if _issued_by(current, r)), None)
        if anchor is not None:
            path.append(anchor)
            break
        issuer = next((c for c in path_certs[1:] if c not in path and _issued_by(current, c)), None)
        if issuer is None or len(path) > MAX_CERTIFICATES:
            return f"no issuer of {_name(current)} among the RIM's certificates and roots"
        path.append(issuer)
    try:
        for depth, cert in enumerate(path):
            _check_link(cert, depth, at)
    except ValueError as exc:
        return str(exc)
    return ""


def _check_link(cert: x509.Certificate, depth: int, at: datetime) -> None:
    """Steps 2 to 4 of ``_walk_chain`` for the certificate ``depth`` above the leaf;
    ValueError says why not."""
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise ValueError(f"{_name(cert)} is not valid at {_utc(at)}")
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise ValueError(
                f"{_name(cert)} has an unknown critical extension {ext.oid.dotted_string}"
            )
    if _extension(cert, x509.NameConstraints) or _extension(cert, x509.PolicyConstraints):
        raise ValueError(f"{_name(cert)} has name or policy constraints (not checked here)")
    constraints = _extension(cert, x509.BasicConstraints)
    if depth == 0:
        _digital_signature(None, cert, _extension(cert, x509.KeyUsage))
        _not_a_ca(None, cert, constraints)
        return
    _must_be_ca(None, cert, constraints)
    _key_cert_sign(None, cert, _extension(cert, x509.KeyUsage))
    below = depth - 1  # CA certificates between this one and the leaf
    if constraints.path_length is not None and below > constraints.path_length:
        raise ValueError(
            f"{_name(cert)} allows {constraints.path_length} CAs below it, found {below}"
        )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _verify_signature(data: bytes, leaf: x509.Certificate, at: datetime, source: str) -> Any:
    """Step 4: the XML signature with the verified leaf's key; returns the signed element."""
    try:
        result = XMLVerifier().verify(
            data, x509_cert=leaf, parser=_parser(), expect_config=_expect(at)
        )
    except etree.DocumentInvalid as exc:  # signxml validates ds:Signature against its schema
        raise RimFormatError(
            f"{_what(source)}: ds:Signature: expected XML-DSig's schema, found: {exc}"
        ) from None
    except (SignXMLException, ValueError, TypeError, etree.LxmlError) as exc:
        # TypeError: signxml's b64decode of an empty SignatureValue, for one.
        raise RimSignatureError(
            f"{_what(source)}: signer {_name(leaf)}: expected a valid XML signature "
            f"(ecdsa-sha384, one SHA-384 reference) by the signer over the document, "
            f"found: {exc}"
        ) from None
    signed = getattr(result, "signed_xml", None)
    if signed is None or signed.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise RimSignatureError(
            f"{_what(source)}: signer {_name(leaf)}: expected the signature to cover the "
            f"whole SoftwareIdentity, found it covers "
            f"{'nothing' if signed is None else signed.tag}"
        )
    return signed


def _one(parent: Any, tag: str, source: str) -> Any:
    found = parent.findall(f"{{{SWID_NS}}}{tag}")
    if len(found) != 1:
        raise RimFormatError(
            f"{_what(source)}: expected one {tag} in SoftwareIdentity, found {len(found)}"
        )
    return found[0]


def _attribute(element: Any, name: str, field: str, source: str) -> str:
    value = element.get(name)
    if value is None or not value.strip():
        raise RimFormatError(f"{_what(source)}: {field}: expected a value, found none")
    return str(value).strip()


def _integer(element: Any, name: str, field: str, source: str, *, low: int, high: int) -> int:
    text = _attribute(element, name, field, source)
    if not _DECIMAL.fullmatch(text) or not low <= int(text) <= high:
        raise RimFormatError(
            f"{_what(source)}: {field}: expected an integer {low} to {high}, found {text[:32]!r}"
        )
    return int(text)


def _measurement(resource: Any, seen: set[int], source: str) -> ReferenceMeasurement | None:
    """One Resource; None when inactive (NVIDIA marks unused indices active="False")."""
    what = _what(source)
    rtype = resource.get("type")
    if rtype != "Measurement":
        raise RimFormatError(
            f"{what}: Payload Resource: expected type Measurement, found {str(rtype)[:32]!r}"
        )
    index = _integer(resource, "index", "Resource index", source, low=0, high=254)
    field = f"Resource index {index}"
    if index in seen:
        raise RimFormatError(f"{what}: {field}: expected each index once, found a repeat")
    seen.add(index)
    active = resource.get("active")
    if active not in ("True", "False"):
        raise RimFormatError(f"{what}: {field} active: expected True or False, found {active!r}")
    count = _integer(
        resource, "alternatives", f"{field} alternatives", source, low=1, high=MAX_ALTERNATIVES
    )
    size = _integer(resource, "size", f"{field} size", source, low=0, high=1 << 16)
    if size != SHA384_SIZE:
        raise RimFormatError(
            f"{what}: {field} size: expected {SHA384_SIZE} (SHA-384), found {size}"
        )
    hashes = {
        name[len(f"{{{SHA384_NS}}}") :]: value
        for name, value in resource.attrib.items()
        if name.startswith(f"{{{SHA384_NS}}}")
    }
    wanted = {f"Hash{n}" for n in range(count)}
    if set(hashes) != wanted:
        raise RimFormatError(
            f"{what}: {field}: expected SHA-384 attributes {sorted(wanted)}, found {sorted(hashes)}"
        )
    values = []
    for n in range(count):
        text = hashes[f"Hash{n}"]
        value = bytes.fromhex(text) if _HEX.fullmatch(text) else b""
        if len(value) != size:
            raise RimFormatError(
                f"{what}: {field} Hash{n}: expected {size} bytes in hex, found {text[:120]!r}"
            )
        values.append(value)
    if active == "False":
        return None
    # RIM indices count from 0, SPDM measurement blocks from 1 (nvtrust compares i with i+1).
    return ReferenceMeasurement(index + 1, tuple(values), size, str(resource.get("name") or ""))


def _read(signed: Any, signer: str, source: str) -> Rim:
    """Step 5: the Rim, from the signed element only."""
    meta = _one(signed, "Meta", source)
    payload = _one(signed, "Payload", source)
    version = _attribute(meta, "colloquialVersion", "Meta colloquialVersion", source)
    kind = rim_kind(version, source=source)
    product = _attribute(meta, "product", "Meta product", source)
    tag_id = _attribute(signed, "tagId", "SoftwareIdentity tagId", source)
    # Elements only: comments are not signed content (C14N of URI="" drops them) nor read.
    resources = [child for child in payload if isinstance(child.tag, str)]
    if len(resources) > MAX_RESOURCES:
        raise RimFormatError(
            f"{_what(source)}: Payload: expected at most {MAX_RESOURCES} Resources, "
            f"found {len(resources)}"
        )
    seen: set[int] = set()
    measurements = []
    for resource in resources:
        if resource.tag != f"{{{SWID_NS}}}Resource":
            raise RimFormatError(
                f"{_what(source)}: Payload: expected only Resource elements, found {resource.tag}"
            )
        measurement = _measurement(resource, seen, source)
        if measurement is not None:
            measurements.append(measurement)
    return Rim(
        kind=kind,
        version=version,
        product=product,
        tag_id=tag_id,
        measurements=tuple(sorted(measurements, key=lambda m: m.index)),
        signer=signer,
        source=source,
        format="swid",
    )


def load_rim(
    data: bytes, *, roots: Sequence[x509.Certificate], at: datetime, source: str = ""
) -> Rim:
    """Verify a SWID-tag RIM (signer chain to one of ``roots`` at ``at``, then its XML
    signature with that signer) and return what it signs. ``RimFormatError`` for bytes that
    are not such a RIM, ``RimSignatureError`` for a chain or signature that does not verify;
    both name ``source`` (a file name) and the field or signer."""
    if at.tzinfo is None:
        raise ValueError("load_rim: `at` must be timezone-aware")
    data = bytes(data)
    root = _parse(data, source)
    certs = _certificates(root, source)
    leaf = _verify_chain(certs, roots, at, source)
    signed = _verify_signature(data, leaf, at, source)
    return _read(signed, _name(leaf), source)


def load_rim_file(path: Path, *, roots: Sequence[x509.Certificate], at: datetime) -> Rim:
    """``load_rim`` of a file, reading at most ``MAX_RIM_BYTES`` + 1 bytes; ``source`` is
    the path as given. OSError is the caller's to report."""
    with path.open("rb") as handle:
        data = handle.read(MAX_RIM_BYTES + 1)
    return load_rim(data, roots=roots, at=at, source=str(path))


class FileRims:
    """A ``RimSource`` over RIMs given explicitly (``devtrust gpu check --rim FILE``):
    ``find`` returns the RIM of that kind for that version, else one of that kind for another
    version (the appraisal names the mismatch), else None."""

    def __init__(self, rims: Iterable[Rim]) -> None:
        self.rims: tuple[Rim, ...] = tuple(rims)

    def find(self, kind: RimKind, version: str) -> Rim | None:
        of_kind = [rim for rim in self.rims if rim.kind is kind]
        for rim in of_kind:
            if same_version(rim.version, version):
                return rim
        return of_kind[0] if of_kind else None
