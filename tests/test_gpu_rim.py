"""NVIDIA RIMs (issue 14): the recorded driver and VBIOS RIMs verify at a time their signer
was valid and give their active golden values; changed, re-signed, wrapped, expired, foreign
and malformed copies each give their named error. RIMs with other content are signed here
by a test PKI (cryptography + signxml), standing in for NVIDIA's."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml.algorithms import (
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureConstructionMethod,
    SignatureMethod,
)
from signxml.signer import XMLSigner

from devtrust.verifier import config
from devtrust.verifier.errors import MalformedInput, Rejected
from devtrust.verifier.gpu import rim as rimmod
from devtrust.verifier.gpu.rim import (
    DSIG_NS,
    MAX_RIM_BYTES,
    SHA384_NS,
    SWID_NS,
    FileRims,
    RimFormatError,
    RimSignatureError,
    load_rim,
    load_rim_file,
    rim_kind,
)
from devtrust.verifier.gpu.types import ReferenceMeasurement, Rim, RimKind
from tests.corpus import corpus_root

CORPUS = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
DRIVER = CORPUS / "Driver_RIM_test_no_gpu.swidtag"
VBIOS = CORPUS / "1010_0200_882_96005E0001_test_no_gpu.swidtag"
VBIOS_PROD = CORPUS / "1010_0200_882_96005E0001_PROD.swidtag"
RIM_ROOT = x509.load_pem_x509_certificate((CORPUS / "verifier_RIM_root.pem").read_bytes())
DEVICE_ROOT = x509.load_pem_x509_certificate((CORPUS / "verifier_device_root.pem").read_bytes())
WHEN = datetime(2024, 6, 1, tzinfo=UTC)  # NVIDIA's RIM signer: 2023-06-23 to 2025-06-22
ZERO = bytes(48)


def element(tag: str, ns: str = SWID_NS) -> str:
    return f"{{{ns}}}{tag}"


# --- a test PKI and signer standing in for NVIDIA's -----------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devtrust tests, NOT NVIDIA"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool,
    path_length: int | None = None,
    usage: x509.KeyUsage | None = None,
    not_after: datetime = WHEN + timedelta(days=365),
    extra: Callable[[x509.CertificateBuilder], x509.CertificateBuilder] | None = None,
) -> x509.Certificate:
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(WHEN - timedelta(days=365))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            usage if usage is not None else _usage(sign=not ca, cert_sign=ca), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if extra:
        builder = extra(builder)
    return builder.sign(signing_key, hashes.SHA384())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@dataclass(frozen=True)
class RimPki:
    """Root -> intermediate (pathlen 0) -> RIM signer, all P-384, valid around WHEN."""

    root: x509.Certificate
    intermediate: x509.Certificate
    signer: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey
    intermediate_key: ec.EllipticCurvePrivateKey

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.signer, self.intermediate, self.root]

    @classmethod
    def create(cls, **signer_options: Any) -> RimPki:
        root_key, intermediate_key, signer_key = new_key(), new_key(), new_key()
        root = make_cert("RIM test root", root_key, ca=True)
        intermediate = make_cert(
            "RIM test intermediate", intermediate_key, (root, root_key), ca=True, path_length=0
        )
        options = {"ca": False, **signer_options}
        signer = make_cert(
            "RIM test signer", signer_key, (intermediate, intermediate_key), **options
        )
        return cls(root, intermediate, signer, signer_key, intermediate_key)


@pytest.fixture(scope="module")
def pki() -> RimPki:
    return RimPki.create()


def unsigned(data: bytes) -> Any:
    """The document without its signature, to change and sign again."""
    doc = etree.fromstring(data)
    signature = doc.find(element("Signature", DSIG_NS))
    if signature is not None:
        doc.remove(signature)
    return doc


def sign(
    doc: Any,
    pki: RimPki,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    certs: list[x509.Certificate] | None = None,
    reference_uri: str | None = None,
) -> bytes:
    """Sign as NVIDIA does: enveloped, C14N 1.1, ecdsa-sha384, KeyInfo with the chain."""
    signer = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm=SignatureMethod.ECDSA_SHA384,
        digest_algorithm=DigestAlgorithm.SHA384,
        c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
    )
    signed = signer.sign(
        copy.deepcopy(doc),
        key=key or pki.signer_key,
        cert=certs if certs is not None else pki.chain,
        reference_uri=reference_uri,
    )
    return bytes(etree.tostring(signed))


def resource(doc: Any, index: int) -> Any:
    """The Resource of RIM index ``index`` in a document or a Payload."""
    payload = doc if doc.tag == element("Payload") else doc.find(element("Payload"))
    found = [r for r in payload if r.get("index") == str(index)]
    assert len(found) == 1
    return found[0]


def hash_name(n: int) -> str:
    return f"{{{SHA384_NS}}}Hash{n}"


# --- the recorded RIMs ------------------------------------------------------------------------


def test_recorded_driver_rim_verifies_and_gives_its_active_values() -> None:
    rim = load_rim(DRIVER.read_bytes(), roots=[RIM_ROOT], at=WHEN, source="driver.swidtag")
    assert rim.kind is RimKind.DRIVER
    assert rim.version == "545.00"
    assert rim.product == "GH100"
    assert rim.tag_id.startswith("f0d3a263ab9ef4b93c8fc972")
    assert rim.signer.startswith("CN=HCC RIM L4 Signer,O=NVIDIA Corporation")
    assert rim.source == "driver.swidtag"
    assert rim.format == "swid"
    assert len(rim.measurements) == 21
    # RIM index 7 (active) is SPDM block 8; RIM index 0 (inactive) is absent.
    first = rim.measurements[0]
    assert first.index == 8
    assert first.name == "Measurement_7"
    assert first.size == 48
    assert first.alternatives == (
        bytes.fromhex(
            "0e0ee161b59bf124ce6b6dca6efa7616d28077862c0e57dca7d5efd63d00eeed"
            "4851922941e846a38c464cbedbc168d9"
        ),
    )
    assert all(m.index != 1 for m in rim.measurements)
    assert [m.index for m in rim.measurements] == sorted(m.index for m in rim.measurements)


def test_recorded_vbios_rims_verify_and_differ_where_prod_differs() -> None:
    test = load_rim_file(VBIOS, roots=[RIM_ROOT], at=WHEN)
    prod = load_rim_file(VBIOS_PROD, roots=[RIM_ROOT], at=WHEN)
    assert test.kind is prod.kind is RimKind.VBIOS
    assert test.version == prod.version == "96.00.5E.00.01"
    assert test.source == str(VBIOS)
    assert len(test.measurements) == len(prod.measurements) == 12
    differ = [
        a.index
        for a, b in zip(test.measurements, prod.measurements, strict=True)
        if a.alternatives != b.alternatives
    ]
    assert len(differ) == 4


def test_the_shipped_rim_root_is_the_corpus_root() -> None:
    shipped = x509.load_pem_x509_certificate(config.DEFAULT_RIM_ROOT.read_bytes())
    rim = load_rim(DRIVER.read_bytes(), roots=[shipped], at=WHEN)
    assert rim.version == "545.00"


# --- time -------------------------------------------------------------------------------------


def test_recorded_rim_fails_after_its_signer_expired_and_says_use_at() -> None:
    with pytest.raises(RimSignatureError) as caught:
        load_rim(DRIVER.read_bytes(), roots=[RIM_ROOT], at=datetime(2026, 1, 1, tzinfo=UTC))
    message = str(caught.value)
    assert "HCC RIM L4 Signer" in message
    assert "expired at 2026-01-01T00:00:00Z" in message
    assert "to 2025-06" in message
    assert "--at" in message
    assert isinstance(caught.value, Rejected)


def test_recorded_rim_fails_before_its_signer_was_issued() -> None:
    with pytest.raises(RimSignatureError, match="not yet valid at 2023-01-01T00:00:00Z"):
        load_rim(DRIVER.read_bytes(), roots=[RIM_ROOT], at=datetime(2023, 1, 1, tzinfo=UTC))


def test_a_naive_time_is_caller_misuse() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        load_rim(DRIVER.read_bytes(), roots=[RIM_ROOT], at=datetime(2024, 6, 1))


# --- signature and chain ------------------------------------------------------------------------


def test_one_changed_digest_in_a_signed_resource_is_refused() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    target = resource(doc, 7)
    value = target.get(hash_name(0))
    target.set(hash_name(0), ("1" if value[0] != "1" else "2") + value[1:])
    with pytest.raises(
        RimSignatureError, match=r"HCC RIM L4 Signer.*expected a valid XML signature"
    ):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


def test_a_keyinfo_certificate_with_a_bad_x509_version_is_a_format_error() -> None:
    """cryptography raises InvalidVersion (not a ValueError) for a certificate whose version
    field is not v1-v3: named as the KeyInfo certificate, never a traceback, and before any
    signature is looked at."""
    doc = etree.fromstring(DRIVER.read_bytes())
    first = doc.find(".//" + element("X509Certificate", "http://www.w3.org/2000/09/xmldsig#"))
    der = bytearray(base64.b64decode("".join((first.text or "").split())))
    at = der.index(b"\xa0\x03\x02\x01\x02")  # version [0] EXPLICIT INTEGER 2 (v3)
    der[at + 4] = 7
    first.text = base64.b64encode(bytes(der)).decode()
    with pytest.raises(RimFormatError, match="KeyInfo X509Certificate 0"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


def test_a_changed_version_in_signed_meta_is_refused() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    doc.find(element("Meta")).set("colloquialVersion", "550.90.07")
    with pytest.raises(RimSignatureError, match="Digest mismatch"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


def test_a_foreign_root_is_a_chain_error(pki: RimPki) -> None:
    with pytest.raises(RimSignatureError, match="expected a certificate path to a RIM root"):
        load_rim(DRIVER.read_bytes(), roots=[pki.root], at=WHEN)
    with pytest.raises(RimSignatureError, match="expected a certificate path"):
        load_rim(DRIVER.read_bytes(), roots=[DEVICE_ROOT], at=WHEN)


def test_no_roots_verifies_nothing() -> None:
    with pytest.raises(RimSignatureError, match="no RIM root"):
        load_rim(DRIVER.read_bytes(), roots=[], at=WHEN)


def test_a_rim_signed_by_another_pki_does_not_chain_to_nvidia(pki: RimPki) -> None:
    data = sign(unsigned(DRIVER.read_bytes()), pki)
    assert load_rim(data, roots=[pki.root], at=WHEN).version == "545.00"
    with pytest.raises(RimSignatureError, match="expected a certificate path"):
        load_rim(data, roots=[RIM_ROOT], at=WHEN)


def test_changed_values_re_signed_by_a_trusted_signer_are_read(pki: RimPki) -> None:
    doc = unsigned(DRIVER.read_bytes())
    resource(doc, 7).set(hash_name(0), "ab" * 48)
    rim = load_rim(sign(doc, pki), roots=[pki.root], at=WHEN)
    assert rim.signer == pki.signer.subject.rfc4514_string()
    assert rim.measurements[0].alternatives == (bytes.fromhex("ab" * 48),)


def test_the_signature_is_checked_with_the_leaf_not_any_key(pki: RimPki) -> None:
    """KeyInfo names the test chain, but another key signed: the chain verifies, the
    signature does not (signxml is given the verified leaf, never the document's own key)."""
    data = sign(unsigned(DRIVER.read_bytes()), pki, key=new_key())
    with pytest.raises(RimSignatureError, match="Signature verification failed"):
        load_rim(data, roots=[pki.root], at=WHEN)


def test_nvidia_signature_with_a_swapped_keyinfo_chain_is_refused(pki: RimPki) -> None:
    """NVIDIA's signed document, its KeyInfo replaced by a trusted test chain."""
    ours = etree.fromstring(sign(unsigned(DRIVER.read_bytes()), pki))
    doc = etree.fromstring(DRIVER.read_bytes())
    nvidia_info = doc.find(f"{element('Signature', DSIG_NS)}/{element('KeyInfo', DSIG_NS)}")
    our_info = ours.find(f"{element('Signature', DSIG_NS)}/{element('KeyInfo', DSIG_NS)}")
    nvidia_info.getparent().replace(nvidia_info, our_info)
    with pytest.raises(RimSignatureError, match="Signature verification failed"):
        load_rim(etree.tostring(doc), roots=[pki.root], at=WHEN)


def test_a_signer_without_digital_signature_usage_is_refused() -> None:
    pki = RimPki.create(usage=_usage(sign=False, cert_sign=False))
    data = sign(unsigned(DRIVER.read_bytes()), pki)
    with pytest.raises(RimSignatureError, match="digitalSignature"):
        load_rim(data, roots=[pki.root], at=WHEN)


def test_a_ca_certificate_as_signer_is_refused() -> None:
    pki = RimPki.create(ca=True, usage=_usage(sign=True, cert_sign=True))
    data = sign(unsigned(DRIVER.read_bytes()), pki)
    with pytest.raises(RimSignatureError, match="expected a certificate path"):
        load_rim(data, roots=[pki.root], at=WHEN)


def test_an_expired_test_signer_is_named(pki: RimPki) -> None:
    later = WHEN + timedelta(days=400)
    data = sign(unsigned(DRIVER.read_bytes()), pki)
    with pytest.raises(RimSignatureError, match="NOT NVIDIA is expired at 2025-07-06T00:00:00Z"):
        load_rim(data, roots=[pki.root], at=later)


def test_a_signature_over_part_of_the_document_is_refused(pki: RimPki) -> None:
    """A valid signature whose one reference covers only the Payload: the Meta (version)
    would be unsigned, so the RIM is refused."""
    doc = unsigned(DRIVER.read_bytes())
    doc.find(element("Payload")).set("Id", "payload")
    data = sign(doc, pki, reference_uri="#payload")
    with pytest.raises(RimSignatureError, match="expected the signature to cover the whole"):
        load_rim(data, roots=[pki.root], at=WHEN)


def test_sha256_signatures_are_not_accepted(pki: RimPki) -> None:
    signer = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm=SignatureMethod.ECDSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
    )
    signed = signer.sign(unsigned(DRIVER.read_bytes()), key=pki.signer_key, cert=pki.chain)
    with pytest.raises(RimSignatureError, match="ECDSA_SHA256 forbidden"):
        load_rim(etree.tostring(signed), roots=[pki.root], at=WHEN)


def test_sha256_reference_digests_are_not_accepted(pki: RimPki) -> None:
    signer = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm=SignatureMethod.ECDSA_SHA384,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
    )
    signed = signer.sign(unsigned(DRIVER.read_bytes()), key=pki.signer_key, cert=pki.chain)
    with pytest.raises(RimSignatureError, match="SHA256 forbidden"):
        load_rim(etree.tostring(signed), roots=[pki.root], at=WHEN)


# --- signature wrapping -------------------------------------------------------------------------


def _moved_signature_with(*extra: Any) -> bytes:
    """NVIDIA's signed RIM with its ds:Signature moved first (the enveloped-signature
    transform removes it wherever it is: the signature still verifies) and ``extra``
    elements put inside it in a ds:Object, which no signature covers."""
    doc = etree.fromstring(DRIVER.read_bytes())
    signature = doc.find(element("Signature", DSIG_NS))
    doc.remove(signature)
    doc.insert(0, signature)
    holder = etree.SubElement(signature, element("Object", DSIG_NS))
    holder.extend(extra)
    return bytes(etree.tostring(doc))


def test_unsigned_meta_and_payload_inside_the_signature_are_never_read() -> None:
    meta = etree.Element(element("Meta"), colloquialVersion="999.99", product="FAKE")
    payload = etree.Element(element("Payload"))
    etree.SubElement(
        payload,
        element("Resource"),
        {
            "type": "Measurement",
            "index": "7",
            "active": "True",
            "alternatives": "1",
            "size": "48",
            hash_name(0): "ff" * 48,
        },
    )
    data = _moved_signature_with(meta, payload)
    # The unsigned copies come first in document order: a reader searching the parsed
    # input (".//Meta") would take them.
    parsed = etree.fromstring(data)
    assert parsed.find(f".//{element('Meta')}").get("colloquialVersion") == "999.99"
    rim = load_rim(data, roots=[RIM_ROOT], at=WHEN)
    assert rim.version == "545.00"
    assert rim.product == "GH100"
    assert len(rim.measurements) == 21
    assert rim.measurements[0].alternatives[0].hex().startswith("0e0ee161")


def test_a_signed_payload_moved_aside_for_a_forged_one_is_refused() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    genuine = doc.find(element("Payload"))
    forged = copy.deepcopy(genuine)
    resource(forged, 7).set(hash_name(0), "ff" * 48)
    doc.replace(genuine, forged)
    signature = doc.find(element("Signature", DSIG_NS))
    etree.SubElement(signature, element("Object", DSIG_NS)).append(genuine)
    with pytest.raises(RimSignatureError, match="expected a valid XML signature"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


def test_a_second_payload_beside_the_signed_one_is_refused() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    doc.insert(2, etree.Element(element("Payload")))
    with pytest.raises(RimSignatureError, match="expected a valid XML signature"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


def test_the_signed_document_wrapped_in_a_forged_one_is_refused() -> None:
    """The classic wrapping: a forged root carries the genuine signature, the genuine
    (signed) content moved into an extension below it."""
    genuine = etree.fromstring(DRIVER.read_bytes())
    signature = genuine.find(element("Signature", DSIG_NS))
    genuine.remove(signature)
    forged = copy.deepcopy(genuine)
    forged.find(element("Meta")).set("colloquialVersion", "550.90.07")
    etree.SubElement(forged, element("Extension")).append(genuine)
    forged.append(signature)
    with pytest.raises(RimSignatureError, match="Digest mismatch"):
        load_rim(etree.tostring(forged), roots=[RIM_ROOT], at=WHEN)
    # ... or the signature left inside the moved copy: not a child of the root.
    forged.remove(signature)
    genuine.append(signature)
    with pytest.raises(RimFormatError, match=r"expected one ds:Signature, a child .* found 1 else"):
        load_rim(etree.tostring(forged), roots=[RIM_ROOT], at=WHEN)


def test_comments_are_outside_the_signature_and_never_read() -> None:
    """C14N of URI="" drops comments: one added to the Payload leaves the signature valid,
    and the reader skips it."""
    doc = etree.fromstring(DRIVER.read_bytes())
    doc.find(element("Payload")).insert(3, etree.Comment(" index 7: ff..ff "))
    rim = load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)
    assert len(rim.measurements) == 21


def test_two_signatures_are_refused() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    doc.append(copy.deepcopy(doc.find(element("Signature", DSIG_NS))))
    with pytest.raises(RimFormatError, match=r"expected one ds:Signature.*found 2"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


# --- parsing ------------------------------------------------------------------------------------

BOMB = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>\n'
)


def test_an_entity_bomb_is_refused_before_parsing() -> None:
    body = DRIVER.read_bytes().replace(b'name="GH100"', b'name="&lol3;"', 1)
    with pytest.raises(RimFormatError, match="expected no DOCTYPE or ENTITY declaration"):
        load_rim(BOMB + body, roots=[RIM_ROOT], at=WHEN)


def test_a_doctype_in_another_encoding_is_refused_after_parsing() -> None:
    """UTF-16 hides "<!DOCTYPE" from a byte search; the parsed document still shows it."""
    text = '<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE SoftwareIdentity>\n'
    data = text.encode("utf-16") + DRIVER.read_text(encoding="utf-8").encode("utf-16")[2:]
    with pytest.raises(RimFormatError, match="expected no DOCTYPE declaration, found one"):
        load_rim(data, roots=[RIM_ROOT], at=WHEN)


def test_truncated_xml_is_a_format_error() -> None:
    data = DRIVER.read_bytes()
    with pytest.raises(RimFormatError, match="expected well-formed XML") as caught:
        load_rim(data[: len(data) // 2], roots=[RIM_ROOT], at=WHEN, source="cut.swidtag")
    assert "RIM cut.swidtag" in str(caught.value)
    assert isinstance(caught.value, MalformedInput)


def test_too_large_input_is_refused_before_parsing() -> None:
    data = DRIVER.read_bytes() + b" " * MAX_RIM_BYTES
    with pytest.raises(RimFormatError, match=f"expected at most {MAX_RIM_BYTES} bytes"):
        load_rim(data, roots=[RIM_ROOT], at=WHEN)


def test_load_rim_file_reads_no_more_than_the_bound(tmp_path: Path) -> None:
    big = tmp_path / "big.swidtag"
    big.write_bytes(b" " * (MAX_RIM_BYTES * 2))
    with pytest.raises(RimFormatError, match=f"expected at most {MAX_RIM_BYTES} bytes, found"):
        load_rim_file(big, roots=[RIM_ROOT], at=WHEN)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(
            lambda d: d.replace(b"<SoftwareIdentity ", b"<Identity ", 1).replace(
                b"</SoftwareIdentity>", b"</Identity>"
            ),
            "root element: expected SoftwareIdentity",
            id="not-a-swid-tag",
        ),
        pytest.param(
            lambda d: d.replace(b"<ds:X509Certificate>", b"<ds:X509Certificate>!!", 1),
            "KeyInfo X509Certificate 0: expected a base64 DER certificate",
            id="bad-certificate",
        ),
        pytest.param(
            lambda d: d.replace(b"</ds:SignedInfo>", b"<ds:Object/></ds:SignedInfo>", 1),
            "ds:Signature: expected XML-DSig's schema",
            id="schema",
        ),
    ],
)
def test_broken_signature_parts_are_format_errors(
    change: Callable[[bytes], bytes], match: str
) -> None:
    data = change(DRIVER.read_bytes())
    with pytest.raises(RimFormatError, match=match):
        load_rim(data, roots=[RIM_ROOT], at=WHEN)


def test_an_empty_signature_value_is_refused() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    doc.find(".//" + element("SignatureValue", DSIG_NS)).text = None
    with pytest.raises(RimSignatureError, match="expected a valid XML signature"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


def test_a_signature_without_certificates_is_a_format_error() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    x509_data = doc.find(".//" + element("X509Data", DSIG_NS))
    for child in list(x509_data):
        x509_data.remove(child)
    with pytest.raises(RimFormatError, match="expected 1 to 8 X509Certificate, found 0"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


def test_too_many_keyinfo_certificates_are_a_format_error() -> None:
    doc = etree.fromstring(DRIVER.read_bytes())
    x509_data = doc.find(".//" + element("X509Data", DSIG_NS))
    for child in list(x509_data)[:3] * 2:
        x509_data.append(copy.deepcopy(child))
    with pytest.raises(RimFormatError, match="expected 1 to 8 X509Certificate, found 10"):
        load_rim(etree.tostring(doc), roots=[RIM_ROOT], at=WHEN)


# --- the signed content, checked after the signature (signed by the test PKI) -----------------


def _set(which: int, /, **attributes: str) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        target = resource(doc, which)
        for name, value in attributes.items():
            target.set(hash_name(int(name[4:])) if name.startswith("Hash") else name, value)

    return change


def _duplicate_index(doc: Any) -> None:
    resource(doc, 8).set("index", "7")


def _second(tag: str) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        doc.append(copy.deepcopy(doc.find(element(tag))))

    return change


def _meta(**attributes: str) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        for name, value in attributes.items():
            doc.find(element("Meta")).set(name, value)

    return change


def _foreign_child(doc: Any) -> None:
    etree.SubElement(doc.find(element("Payload")), element("Link"))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(_duplicate_index, "Resource index 7: expected each index once", id="dup"),
        pytest.param(_set(7, size="32"), "index 7 size: expected 48", id="size"),
        pytest.param(_set(7, Hash0="ab" * 47), "index 7 Hash0: expected 48 bytes", id="short"),
        pytest.param(_set(7, Hash0="zz" * 48), "index 7 Hash0: expected 48 bytes", id="not-hex"),
        pytest.param(
            _set(7, alternatives="2"),
            r"expected SHA-384 attributes \['Hash0', 'Hash1'\]",
            id="alternatives",
        ),
        pytest.param(_set(7, Hash1="ab" * 48), r"found \['Hash0', 'Hash1'\]", id="extra-hash"),
        pytest.param(
            _set(7, alternatives="0"), "alternatives: expected an integer 1 to 64", id="zero"
        ),
        pytest.param(_set(7, active="true"), "active: expected True or False", id="active"),
        pytest.param(
            _set(7, index="-1"), "Resource index: expected an integer 0 to 254", id="index"
        ),
        pytest.param(
            _set(7, index="\u00b2"), "Resource index: expected an integer", id="superscript"
        ),
        pytest.param(
            _set(7, index="\u0663"), "Resource index: expected an integer", id="arabic-digit"
        ),
        pytest.param(
            _set(7, Hash0="ab " * 47 + "ab"), "index 7 Hash0: expected 48 bytes", id="spaced-hex"
        ),
        pytest.param(_set(7, type="Firmware"), "expected type Measurement", id="type"),
        pytest.param(
            _second("Payload"), "expected one Payload in SoftwareIdentity, found 2", id="payloads"
        ),
        pytest.param(_second("Meta"), "expected one Meta in SoftwareIdentity, found 2", id="metas"),
        pytest.param(
            _meta(colloquialVersion="r545"), "colloquialVersion: expected a driver", id="version"
        ),
        pytest.param(
            _meta(colloquialVersion=" "), "colloquialVersion: expected a value", id="empty"
        ),
        pytest.param(_meta(product=""), "Meta product: expected a value", id="product"),
        pytest.param(_foreign_child, "expected only Resource elements", id="child"),
    ],
)
def test_signed_content_that_does_not_fit_is_a_format_error(
    pki: RimPki, change: Callable[[Any], None], match: str
) -> None:
    doc = unsigned(DRIVER.read_bytes())
    change(doc)
    with pytest.raises(RimFormatError, match=match):
        load_rim(sign(doc, pki), roots=[pki.root], at=WHEN)


def test_the_resource_count_is_bounded(pki: RimPki, monkeypatch: pytest.MonkeyPatch) -> None:
    data = sign(unsigned(DRIVER.read_bytes()), pki)
    monkeypatch.setattr(rimmod, "MAX_RESOURCES", 63)
    with pytest.raises(RimFormatError, match="expected at most 63 Resources, found 64"):
        load_rim(data, roots=[pki.root], at=WHEN)


def test_alternatives_and_inactive_indices(pki: RimPki) -> None:
    doc = unsigned(DRIVER.read_bytes())
    _set(7, alternatives="2", Hash1="cd" * 48)(doc)
    _set(21, active="False")(doc)
    _set(0, active="True", Hash0="ee" * 48)(doc)
    rim = load_rim(sign(doc, pki), roots=[pki.root], at=WHEN)
    by_index = {m.index: m for m in rim.measurements}
    assert by_index[8].alternatives[1] == bytes.fromhex("cd" * 48)
    assert len(by_index[8].alternatives) == 2
    assert 22 not in by_index
    assert by_index[1].alternatives == (bytes.fromhex("ee" * 48),)
    assert len(rim.measurements) == 21


def test_a_vbios_version_makes_a_vbios_rim(pki: RimPki) -> None:
    doc = unsigned(DRIVER.read_bytes())
    _meta(colloquialVersion="96.00.9f.00.01")(doc)
    rim = load_rim(sign(doc, pki), roots=[pki.root], at=WHEN)
    assert (rim.kind, rim.version) == (RimKind.VBIOS, "96.00.9f.00.01")


@pytest.mark.parametrize(
    ("version", "kind"),
    [
        ("545.00", RimKind.DRIVER),
        ("550.90.07", RimKind.DRIVER),
        ("96.00.5E.00.01", RimKind.VBIOS),
        ("96.00.50.00.01", RimKind.VBIOS),  # hex pairs that are also digits: VBIOS
        ("96.00.5e.00.01", RimKind.VBIOS),
        ("545", None),
        ("96.00.5E.00", None),
        ("96.00.5G.00.01", None),
        ("545.00 ", None),
        ("", None),
    ],
)
def test_rim_kind(version: str, kind: RimKind | None) -> None:
    if kind is None:
        with pytest.raises(RimFormatError, match="colloquialVersion"):
            rim_kind(version)
    else:
        assert rim_kind(version) is kind


# --- NVIDIA's GeneralizedTime quirk: the path walked by hand --------------------------------


def _corpus_certs() -> list[x509.Certificate]:
    doc = etree.fromstring(DRIVER.read_bytes())
    return rimmod._certificates(doc, "driver")


def test_nvidia_chain_needs_the_generalized_time_quirk() -> None:
    """cryptography refuses NVIDIA's RIM CAs: if it ever accepts them, the quirk can go."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    certs = _corpus_certs()
    verifier = (
        PolicyBuilder()
        .store(Store([RIM_ROOT]))
        .time(WHEN)
        .extension_policies(ca_policy=rimmod._CA_POLICY, ee_policy=rimmod._EE_POLICY)
        .build_client_verifier()
    )
    with pytest.raises(VerificationError, match=rimmod._GENERALIZED_TIME_REFUSAL):
        verifier.verify(certs[0], certs[1:3])
    assert rimmod._walk_chain(certs[:3], [RIM_ROOT], WHEN) == ""


def test_walked_path_checks_each_issuer_signature(pki: RimPki) -> None:
    """An intermediate with the GH100 CA's name and another key does not issue L3."""
    certs = _corpus_certs()
    impostor_key = new_key()
    impostor = (
        x509.CertificateBuilder()
        .subject_name(certs[2].subject)
        .issuer_name(RIM_ROOT.subject)
        .public_key(impostor_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(WHEN - timedelta(days=1))
        .not_valid_after(WHEN + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(impostor_key, hashes.SHA384())
    )
    reason = rimmod._walk_chain([certs[0], certs[1], impostor], [RIM_ROOT], WHEN)
    assert reason.startswith("no issuer of C=US,O=NVIDIA Corporation,CN=NVIDIA Reference Value L3")


def test_walked_path_checks_validity_of_every_certificate() -> None:
    certs = _corpus_certs()
    reason = rimmod._walk_chain(certs[:3], [RIM_ROOT], datetime(2025, 12, 1, tzinfo=UTC))
    assert "HCC RIM L4 Signer" in reason
    assert "not valid at 2025-12-01T00:00:00Z" in reason


def test_walked_path_applies_the_policies() -> None:
    root_key, ca_key, leaf_key = new_key(), new_key(), new_key()
    root = make_cert("walk root", root_key, ca=True)

    def walk(ca: x509.Certificate, leaf: x509.Certificate, *more: x509.Certificate) -> str:
        return rimmod._walk_chain([leaf, *more, ca], [root], WHEN)

    plain_ca = make_cert("walk ca", ca_key, (root, root_key), ca=True, path_length=0)
    good_leaf = make_cert("walk leaf", leaf_key, (plain_ca, ca_key), ca=False)
    assert walk(plain_ca, good_leaf) == ""

    no_sign = make_cert(
        "walk leaf",
        leaf_key,
        (plain_ca, ca_key),
        ca=False,
        usage=_usage(sign=False, cert_sign=False),
    )
    assert "lacks keyUsage digitalSignature" in walk(plain_ca, no_sign)

    ca_leaf = make_cert(
        "walk leaf", leaf_key, (plain_ca, ca_key), ca=True, usage=_usage(sign=True, cert_sign=True)
    )
    assert "is a CA, not a RIM signer" in walk(plain_ca, ca_leaf)

    not_ca = make_cert(
        "walk ca", ca_key, (root, root_key), ca=False, usage=_usage(sign=True, cert_sign=True)
    )
    leaf_of_not_ca = make_cert("walk leaf", leaf_key, (not_ca, ca_key), ca=False)
    assert "is not a CA" in walk(not_ca, leaf_of_not_ca)

    no_cert_sign = make_cert(
        "walk ca", ca_key, (root, root_key), ca=True, usage=_usage(sign=True, cert_sign=False)
    )
    assert "lacks keyCertSign" in walk(
        no_cert_sign, make_cert("walk leaf", leaf_key, (no_cert_sign, ca_key), ca=False)
    )

    # pathlen 0 above another CA
    lower_key = new_key()
    lower = make_cert("walk lower ca", lower_key, (plain_ca, ca_key), ca=True)
    leaf_of_lower = make_cert("walk leaf", leaf_key, (lower, lower_key), ca=False)
    assert "allows 0 CAs below it, found 1" in walk(plain_ca, leaf_of_lower, lower)

    critical = make_cert(
        "walk leaf",
        leaf_key,
        (plain_ca, ca_key),
        ca=False,
        extra=lambda b: b.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            critical=True,
        ),
    )
    assert "unknown critical extension 1.3.6.1.4.1.99999.1" in walk(plain_ca, critical)

    constrained = make_cert(
        "walk ca",
        ca_key,
        (root, root_key),
        ca=True,
        extra=lambda b: b.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
            ),
            critical=True,
        ),
    )
    leaf_of_constrained = make_cert("walk leaf", leaf_key, (constrained, ca_key), ca=False)
    assert "has name or policy constraints" in walk(constrained, leaf_of_constrained)


# --- FileRims ------------------------------------------------------------------------------------


def _rim(kind: RimKind, version: str) -> Rim:
    return Rim(kind, version, "GH100", "tag", (ReferenceMeasurement(1, (ZERO,), 48),))


def test_file_rims_finds_the_version_else_another_of_the_kind() -> None:
    driver, vbios_a, vbios_b = (
        _rim(RimKind.DRIVER, "545.00"),
        _rim(RimKind.VBIOS, "96.00.5E.00.01"),
        _rim(RimKind.VBIOS, "96.00.9F.00.01"),
    )
    rims = FileRims([driver, vbios_a, vbios_b])
    assert rims.find(RimKind.VBIOS, "96.00.9f.00.01") is vbios_b
    assert rims.find(RimKind.VBIOS, "96.00.11.00.01") is vbios_a
    assert rims.find(RimKind.DRIVER, "550.90.07") is driver
    assert FileRims([vbios_a]).find(RimKind.DRIVER, "545.00") is None
