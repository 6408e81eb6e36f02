"""EK certificate chains: the shipped manufacturer store, the corpus's real EK certificates,
and one test per rule of the EK CA policy."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import DEFAULT_ROOTS
from devtrust.verifier.endorsement import EndorsementStore, load_certificates, parse_ek_certificate
from devtrust.verifier.errors import MalformedInput, Rejected
from tests.corpus import corpus_root

NOW = datetime.datetime(2026, 11, 25, 23, 0, tzinfo=datetime.UTC)
TCG_EK_EKU = x509.ObjectIdentifier("2.23.133.8.1")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    issuer: str,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool | None,
    key_cert_sign: bool = True,
    not_after: datetime.datetime | None = None,
    ek: bool = False,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject) if not ek else x509.Name([]))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=365))
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, key_cert_sign, True, False, False),
            critical=True,
        )
    if ek:
        # As TPM vendors issue them: empty subject, critical SAN of TPM manufacturer
        # attributes, the TCG EK EKU (no clientAuth).
        san = x509.DirectoryName(
            x509.Name(
                [
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:53544D20"),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "ST33HTPHAHB4"),
                ]
            )
        )
        b = b.add_extension(x509.SubjectAlternativeName([san]), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([TCG_EK_EKU]), critical=False)
    return b.sign(signer, hashes.SHA256())


def _store(tmp_path: Path, *certs: x509.Certificate) -> EndorsementStore:
    path = tmp_path / "roots.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return EndorsementStore.from_paths([path])


KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
ROOT = _cert("root", "root", KEYS[0], KEYS[0], ca=True)
INTER = _cert("inter", "root", KEYS[1], KEYS[0], ca=True)
EK = _cert("", "inter", KEYS[2], KEYS[1], ca=False, ek=True)


def test_vendor_style_ek_chain_verifies(tmp_path: Path) -> None:
    chain = _store(tmp_path, ROOT).verify(EK, [INTER], now=NOW)
    assert chain == [EK, INTER, ROOT]


def test_intermediate_that_is_not_a_ca_is_refused(tmp_path: Path) -> None:
    not_ca = _cert("inter", "root", KEYS[1], KEYS[0], ca=False)
    with pytest.raises(Rejected, match="does not chain"):
        _store(tmp_path, ROOT).verify(EK, [not_ca], now=NOW)


def test_intermediate_without_basic_constraints_is_refused(tmp_path: Path) -> None:
    bare = _cert("inter", "root", KEYS[1], KEYS[0], ca=None)
    with pytest.raises(Rejected, match="does not chain"):
        _store(tmp_path, ROOT).verify(EK, [bare], now=NOW)


def test_intermediate_without_key_cert_sign_is_refused(tmp_path: Path) -> None:
    no_sign = _cert("inter", "root", KEYS[1], KEYS[0], ca=True, key_cert_sign=False)
    with pytest.raises(Rejected, match="does not chain"):
        _store(tmp_path, ROOT).verify(EK, [no_sign], now=NOW)


def test_expired_ek_certificate_is_refused(tmp_path: Path) -> None:
    old = _cert(
        "",
        "inter",
        KEYS[2],
        KEYS[1],
        ca=False,
        ek=True,
        not_after=NOW - datetime.timedelta(hours=1),
    )
    with pytest.raises(Rejected, match="does not chain"):
        _store(tmp_path, ROOT).verify(old, [INTER], now=NOW)


def test_intermediates_alone_are_not_trust_anchors(tmp_path: Path) -> None:
    """A CA certificate that is not self-signed is offered to path building, never trusted."""
    with pytest.raises(ConfigError, match="no endorsement roots"):
        _store(tmp_path, INTER)
    store = _store(tmp_path, INTER, _cert("other root", "other root", KEYS[0], KEYS[0], ca=True))
    assert [r.subject for r in store.roots] == [_name("other root")]
    with pytest.raises(Rejected):
        store.verify(EK, [], now=NOW)


def test_nv_padding_is_cut_but_other_trailing_data_is_not() -> None:
    der = EK.public_bytes(serialization.Encoding.DER)
    assert parse_ek_certificate(der + b"\xff" * 37) == EK
    assert parse_ek_certificate(der + b"\x00" * 5) == EK
    with pytest.raises(MalformedInput):
        parse_ek_certificate(der + b"\xff\x01")


def test_shipped_store_loads() -> None:
    store = EndorsementStore.from_paths([DEFAULT_ROOTS])
    assert len(store.roots) >= 30
    assert len(store.intermediates) >= 100
    names = " ".join(r.subject.rfc4514_string() for r in store.roots)
    for vendor in ("Infineon", "STMicroelectronics", "Intel", "Google", "GlobalSign"):
        assert vendor in names


# --- the corpus's real EK and AK certificates ------------------------------------------

CORPUS = corpus_root()
CHAINS = json.loads((CORPUS / "expected.json").read_text())["certificate_chains"]


@pytest.mark.parametrize("case", CHAINS, ids=[c["leaf"] for c in CHAINS])
def test_corpus_chain(case: dict[str, Any], tmp_path: Path) -> None:  # a JSON object
    root = CORPUS
    leaf_path = root / str(case["leaf"])
    [leaf] = load_certificates(leaf_path.read_bytes(), source=str(leaf_path))
    assert case["expected"] == "VALID"
    # Against the shipped default store, with no intermediates from the host.
    EndorsementStore.from_paths([DEFAULT_ROOTS]).verify(leaf, [], now=NOW)
    negative = case.get("negative")
    if isinstance(negative, dict) and "chain_with" in negative:
        chain = [str(p) for p in case["chain"]]
        only = EndorsementStore.from_paths([root / chain[-1]])
        [wrong] = load_certificates((root / negative["chain_with"]).read_bytes(), source="x")
        with pytest.raises(Rejected):
            only.verify(leaf, [wrong], now=NOW)
