"""Issue 12, item 5: each crash the fuzzers found (tests/fuzz), as the smallest input that
showed it. Before its fix each of these raised something other than the parser's domain
error (ValueError, TypeError, AttributeError, LookupError, RecursionError,
UnsupportedAlgorithm); now each ends in the domain error with a message that says what is
wrong, or in a result."""

from __future__ import annotations

import datetime
import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devtrust.agent.gpu.smi_xml import SmiXmlError, parse_smi_xml
from devtrust.agent.posture import SshdConfigError, sshd_settings
from devtrust.v1 import attestation_pb2
from devtrust.verifier.enrollment import check_ak, parse_ak
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.policy import MAX_EXPRESSION, Policy, PolicyError
from devtrust.verifier.tpm.bootfacts import EFI_CERT_X509, signature_lists
from devtrust.verifier.tpm.constants import Alg
from devtrust.verifier.tpm.quote import QuoteRejected, check_quote
from devtrust.verifier.tpm.structures import PcrSelect
from devtrust.verifier.wire import load_public_key
from tests import quotes
from tests.fuzz import targets

# --- TPM2B_PUBLIC: an RSA exponent cryptography refuses (ValueError "e must be odd") ---------

RSA_EVEN_EXPONENT = (
    struct.pack(">HHIH", Alg.RSA, Alg.SHA256, 0x00050072, 0)  # type, nameAlg, attributes, policy
    + struct.pack(">HHHHI", Alg.NULL, Alg.RSASSA, Alg.SHA256, 2048, 4)  # sym, scheme, bits, e=4
    + struct.pack(">H", 256)
    + b"\xc5" * 256
)


def test_rsa_public_area_with_an_even_exponent_is_malformed() -> None:
    area = parse_ak(struct.pack(">H", len(RSA_EVEN_EXPONENT)) + RSA_EVEN_EXPONENT)
    with pytest.raises(MalformedInput, match="TPMT_PUBLIC: not an RSA public key: e must be odd"):
        area.public_key()
    with pytest.raises(MalformedInput, match="e must be odd"):
        check_ak(area)


# --- TPMS_ATTEST: a quoted bank the verifier has no name for (ValueError from hash_name) ----

_UNKNOWN_BANK = 0x0400


def _quote_over_unknown_bank() -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    key = ec.derive_private_key(0x0A11, ec.SECP256R1())
    message = quotes.attest(
        extra=b"n" * 32, selection=[PcrSelect(_UNKNOWN_BANK, (0,))], digest=bytes(32)
    )
    return key, message, quotes.ecdsa_signature(key, message)


def test_missing_value_of_an_unknown_quoted_bank_is_a_rejection() -> None:
    key, message, signature = _quote_over_unknown_bank()
    with pytest.raises(QuoteRejected) as caught:
        check_quote(
            attest_bytes=message,
            signature_bytes=signature,
            ak_key=key.public_key(),
            expected_qualifying_data=b"n" * 32,
            requested=[PcrSelect(_UNKNOWN_BANK, (0,))],
            pcr_values={},
        )
    assert caught.value.finding_id == "tpm.quote.pcr_values_missing"
    assert caught.value.found == "0x0400:0"


def test_selection_over_an_unknown_bank_is_a_rejection() -> None:
    key, message, signature = _quote_over_unknown_bank()
    with pytest.raises(QuoteRejected) as caught:
        check_quote(
            attest_bytes=message,
            signature_bytes=signature,
            ak_key=key.public_key(),
            expected_qualifying_data=b"n" * 32,
            requested=[PcrSelect(Alg.SHA256, (0,))],
            pcr_values={},
        )
    assert caught.value.finding_id == "tpm.quote.selection_mismatch"
    assert (caught.value.expected, caught.value.found) == ("sha256:0", "0x0400:0")


# --- event log: a db certificate whose subject cryptography refuses (TypeError) -------------


def _certificate() -> bytes:
    key = ec.derive_private_key(7, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ZZZZ")])
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(when)
        .not_valid_after(when)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # commonName's UTF8String "ZZZZ" as a BIT STRING, which only x500UniqueIdentifier
        # may be: TypeError when the subject is read.
        (b"\x0c\x04ZZZZ", b"\x03\x04\x00ZZZ"),
        # version [0] INTEGER 2 (v3) made 33: cryptography's InvalidVersion, no ValueError.
        (b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x21"),
    ],
    ids=["bitstring-name", "version-33"],
)
def test_db_certificate_cryptography_refuses_is_listed_as_unparsable(
    old: bytes, new: bytes
) -> None:
    assert old in _certificate()
    cert = _certificate().replace(old, new)
    owner = uuid.UUID(int=1)
    entry = owner.bytes_le + cert
    esl = EFI_CERT_X509.bytes_le + struct.pack("<III", 28 + len(entry), 0, len(entry)) + entry
    [listed] = signature_lists(esl)
    assert (listed.kind, listed.owner, listed.subject) == (
        "x509",
        str(owner),
        "<unparsable certificate>",
    )


# --- EvidenceBody: a certify key on a curve cryptography does not know ---------------------


def _spki_on_an_unknown_curve() -> bytes:
    spki = (
        ec.derive_private_key(5, ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # prime256v1 is 1.2.840.10045.3.1.7; 1.2.833.10045.3.1.7 is no curve at all.
    return spki.replace(bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2a8641ce3d030107"))


def test_certify_key_on_an_unknown_curve_is_malformed() -> None:
    unknown = _spki_on_an_unknown_curve()
    with pytest.raises(MalformedInput, match="certify_key_spki: not a DER SubjectPublicKeyInfo"):
        load_public_key(unknown, field="EvidenceBody.certify_key_spki")


# --- nvidia-smi XML ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "message"),
    [("UTF-6", "unknown encoding: UTF-6"), ("UTF-7", "multi-byte encodings are not supported")],
)
def test_xml_encoding_expat_cannot_read_is_not_nvidia_smi_output(
    encoding: str, message: str
) -> None:
    xml = f'<?xml version="1.0" encoding="{encoding}"?><nvidia_smi_log/>'.encode()
    with pytest.raises(SmiXmlError, match=f"not nvidia-smi XML: {message}"):
        parse_smi_xml(xml)


def _smi(gpu: str) -> bytes:
    return f"<nvidia_smi_log><gpu>{gpu}</gpu></nvidia_smi_log>".encode()


@pytest.mark.parametrize(
    "value",
    ["7x", "\N{SUPERSCRIPT TWO}", "99999999999", "-1"],
    ids=["letter", "sup2", "big", "neg"],
)
def test_mig_instance_id_that_is_no_uint32_is_refused(value: str) -> None:
    xml = _smi(
        f"<mig_devices><mig_device><gpu_instance_id>{value}</gpu_instance_id>"
        "</mig_device></mig_devices>"
    )
    with pytest.raises(SmiXmlError, match="<gpu_instance_id> is"):
        parse_smi_xml(xml)


def test_ecc_counters_take_ascii_digits_and_saturate() -> None:
    xml = _smi(
        "<ecc_errors><volatile><dram_uncorrectable>\N{SUPERSCRIPT TWO}</dram_uncorrectable>"
        "</volatile><aggregate><dram_uncorrectable>18446744073709551615</dram_uncorrectable>"
        "<sram_uncorrectable>5</sram_uncorrectable></aggregate></ecc_errors>"
    )
    [gpu] = parse_smi_xml(xml).gpus
    assert not gpu.HasField("ecc_uncorrected_volatile")
    assert gpu.ecc_uncorrected_aggregate == 2**64 - 1


# --- sshd_config: a NUL byte in an Include pattern (ValueError from glob) -----------------


def test_nul_byte_in_sshd_config_is_refused(tmp_path: Path) -> None:
    text = "Include /etc/ssh/sshd_conf\x06\x00\x00ig.d/*.conf\nPermitRootLogin no\n"
    with pytest.raises(SshdConfigError, match=r"^/etc/ssh/sshd_config line 1: a NUL byte$"):
        sshd_settings(text, name="/etc/ssh/sshd_config", root=tmp_path)


# --- policy --------------------------------------------------------------------------------

_RULE = "  - id: r\n    description: d\n    claim: hardware\n    severity: warning\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("policy_id: fuzz-seed\ndata:\n  bulletpolii", "data is a mapping"),  # AttributeError
        ("data: {bulletins: 7}\nrules: []", "data.bulletins a file name"),  # TypeError
        ("1: x\nrules: []\nzz: y", "unknown key(s) 1, zz"),  # TypeError: int < str
        ("rules:\n" + _RULE + "    expr: 'true'\n    1: x\n    zz: y", "rule key(s) 1, zz"),
        (
            "rules:\n" + _RULE + "    expr: 'true'\nrequired_evidence: [{evidence: [os]}]",
            "evidence is one of os, gpu, gpu_attestation, got ['os']",  # TypeError: unhashable list
        ),
        ("rules: " + "[" * 2000 + "]" * 2000, "collections nested too deeply"),  # RecursionError
        (
            "rules:\n" + _RULE + "    expr: '" + "!" * 2000 + "true'",
            "rule r: expression nested too deeply",  # RecursionError in the checker
        ),
        (
            "rules:\n" + _RULE + "    expr: os.kernel_taint != 01",
            "the policy checker cannot read it: number '01' at column 20",  # ValueError: int()
        ),
        (
            "rules:\n" + _RULE + "    expr: '" + "!" * 200_000 + "true'",
            f"rule r: expr is 200004 characters, more than {MAX_EXPRESSION}",  # SIGSEGV in cel
        ),
    ],
    ids=[
        "data-not-a-mapping",
        "bulletins-not-a-name",
        "unknown-keys-of-two-types",
        "unknown-rule-keys-of-two-types",
        "evidence-a-list",
        "yaml-nested",
        "cel-nested",
        "cel-leading-zero",
        "cel-too-long",
    ],
)
def test_policy_that_crashed_the_loader_is_a_policy_error(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.parse(text, source="p.yaml", base=Path("."))
    assert message in str(caught.value)
    assert str(caught.value).startswith("p.yaml")


def test_harnesses_pass_each_regression_input() -> None:
    """The same inputs through the harnesses the fuzzers run (tests/fuzz/targets.py)."""
    targets.check_tpm2b_public(struct.pack(">H", len(RSA_EVEN_EXPONENT)) + RSA_EVEN_EXPONENT)
    targets.check_tpms_attest(_quote_over_unknown_bank()[1])
    body = attestation_pb2.EvidenceBody(certify_key_spki=_spki_on_an_unknown_curve())
    targets.check_evidence_body(body.SerializeToString())
    targets.check_smi_xml(b'<?xml version="1.0" encoding="UTF-6"?><nvidia_smi_log/>')
    targets.check_sshd_config(b"Include a\x00b\n")
    targets.check_policy(b"policy_id: fuzz-seed\ndata:\n  bulletpolii")
