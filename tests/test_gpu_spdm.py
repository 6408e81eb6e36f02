"""NVIDIA GPU attestation reports (issue 14, first slice): the recorded Hopper report from
nvtrust parses, its signature and certificate chain verify offline, and broken copies each
give their named error."""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devtrust.verifier.errors import MalformedInput, Rejected
from devtrust.verifier.gpu import spdm
from tests.corpus import corpus_root

CORPUS = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
REPORT = bytes.fromhex((CORPUS / "hopperAttestationReport.txt").read_text().strip())
CHAIN = x509.load_pem_x509_certificates((CORPUS / "hopperCertChain.txt").read_bytes())
DEVICE_ROOT = x509.load_pem_x509_certificate((CORPUS / "verifier_device_root.pem").read_bytes())
RIM_ROOT = x509.load_pem_x509_certificate((CORPUS / "verifier_RIM_root.pem").read_bytes())
WHEN = datetime(2024, 6, 1, tzinfo=UTC)

REQUEST_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
REQUEST_LEN = 37  # 11 e0 01 ff, nonce, slot id
RECORD_START = REQUEST_LEN + 8  # response header: 4 bytes, NumberOfBlocks, 3-byte length


def test_recorded_report_parses() -> None:
    report = spdm.parse_report(REPORT)
    request, response = report.request, report.response
    assert (request.version, request.param1, request.param2) == (0x11, 0x01, 0xFF)
    assert request.signature_requested
    assert request.nonce == REQUEST_NONCE
    assert request.slot_id == 0
    assert request.raw == REPORT[:REQUEST_LEN]
    assert (response.version, response.param1, response.param2) == (0x11, 0, 0)
    assert len(response.blocks) == 64
    assert [block.index for block in response.blocks] == list(range(1, 65))
    assert all(block.specification == 1 for block in response.blocks)
    assert all(len(block.value) == 48 for block in response.blocks)  # SHA-384 digests
    assert response.blocks[0].value == bytes(48)
    assert response.nonce.hex() == (
        "b4b8a06aaaa35542839388e159d447a5d6f6194998fd86513e2d591ccf640985"
    )
    assert len(response.opaque_data) == 422
    assert len(response.signature) == 96
    assert report.driver_version == "550.90.07"
    assert report.vbios_version == "96.00.9F.00.01"
    assert response.opaque["project"] == "1010"
    assert response.opaque["project_sku"] == "0200"
    assert response.opaque["chip_sku"] == "882"
    fwid = response.opaque["fwid"]
    assert isinstance(fwid, bytes)
    assert len(fwid) == 48
    assert report.transcript == REPORT[:-96]


def test_hex_form_parses_as_the_bytes() -> None:
    text = (CORPUS / "hopperAttestationReport.txt").read_text()
    assert spdm.parse_report_hex(text) == spdm.parse_report(REPORT)
    with pytest.raises(spdm.SpdmFormatError, match="hex digits"):
        spdm.parse_report_hex("zz" + text)


def test_recorded_signature_verifies() -> None:
    spdm.verify_signature(spdm.parse_report(REPORT), CHAIN[0])


def test_recorded_nonce_verifies() -> None:
    spdm.verify_nonce(spdm.parse_report(REPORT), REQUEST_NONCE)


def test_recorded_chain_verifies_to_device_root() -> None:
    path = spdm.verify_chain(CHAIN, DEVICE_ROOT, WHEN)
    assert len(path) == 5
    assert path[0] == CHAIN[0]
    assert path[-1] == DEVICE_ROOT


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_flipped_measurement_byte_fails_signature() -> None:
    # First block's value starts after Index, Spec, Size(2), Type, ValueSize(2).
    broken = _flip(REPORT, RECORD_START + 7)
    report = spdm.parse_report(broken)
    assert report.response.blocks[0].value != bytes(48)
    with pytest.raises(spdm.SpdmSignatureError, match="does not verify") as caught:
        spdm.verify_signature(report, CHAIN[0])
    assert isinstance(caught.value, Rejected)


def test_flipped_signature_byte_fails() -> None:
    broken = _flip(REPORT, len(REPORT) - 10)
    with pytest.raises(spdm.SpdmSignatureError, match="does not verify"):
        spdm.verify_signature(spdm.parse_report(broken), CHAIN[0])


def test_flipped_request_nonce_fails_signature_and_nonce() -> None:
    broken = _flip(REPORT, 4)
    report = spdm.parse_report(broken)
    with pytest.raises(spdm.SpdmSignatureError):
        spdm.verify_signature(report, CHAIN[0])
    with pytest.raises(spdm.SpdmNonceError):
        spdm.verify_nonce(report, REQUEST_NONCE)


def test_wrong_leaf_key_fails_signature() -> None:
    with pytest.raises(spdm.SpdmSignatureError):
        spdm.verify_signature(spdm.parse_report(REPORT), CHAIN[1])


@pytest.mark.parametrize(
    ("length", "field"),
    [
        (0, "request SPDMVersion"),
        (3, "request Param2"),
        (20, "request Nonce"),
        (36, "request SlotIDParam"),
        (REQUEST_LEN + 1, "response RequestResponseCode"),
        (REQUEST_LEN + 6, "response MeasurementRecordLength"),
        (RECORD_START + 100, "response MeasurementRecord"),
        (RECORD_START + 3520 + 10, "response Nonce"),
        (RECORD_START + 3520 + 33, "response OpaqueLength"),
        (RECORD_START + 3520 + 34 + 200, "response OpaqueData"),
        (len(REPORT) - 1, "response Signature"),
    ],
)
def test_truncated_report_names_the_field(length: int, field: str) -> None:
    with pytest.raises(spdm.SpdmFormatError) as caught:
        spdm.parse_report(REPORT[:length])
    error = caught.value
    assert isinstance(error, MalformedInput)
    assert error.field == field
    assert field in str(error)
    assert "bytes left" in str(error)
    assert f"at offset {error.offset}" in str(error)


def test_wrong_codes_and_trailing_bytes_are_named() -> None:
    with pytest.raises(spdm.SpdmFormatError, match=r"request SPDMVersion at offset 0: "):
        spdm.parse_report(b"\x10" + REPORT[1:])
    with pytest.raises(spdm.SpdmFormatError, match="expected 0x60, found 0x61"):
        spdm.parse_report(REPORT[: REQUEST_LEN + 1] + b"\x61" + REPORT[REQUEST_LEN + 2 :])
    with pytest.raises(spdm.SpdmFormatError, match="signature requested"):
        spdm.parse_report(REPORT[:2] + b"\x00" + REPORT[3:])
    with pytest.raises(spdm.SpdmFormatError, match=r"report end .*found 1 bytes"):
        spdm.parse_report(REPORT + b"\x00")


def test_block_size_past_record_is_named() -> None:
    # The first block's MeasurementSize claims more bytes than the record holds.
    at = RECORD_START + 2
    broken = REPORT[:at] + b"\xff\xff" + REPORT[at + 2 :]
    with pytest.raises(spdm.SpdmFormatError) as caught:
        spdm.parse_report(broken)
    assert caught.value.field == "measurement block 1 Measurement"
    assert caught.value.offset == RECORD_START + 4


def test_wrong_expected_nonce_fails() -> None:
    other = bytes(32)
    with pytest.raises(spdm.SpdmNonceError, match=f"expected {other.hex()}, found 931d8dd0"):
        spdm.verify_nonce(spdm.parse_report(REPORT), other)


def test_chain_to_another_root_fails() -> None:
    with pytest.raises(spdm.SpdmChainError, match="expected a path from CN=GH100 A01 GSP FMC LF"):
        spdm.verify_chain(CHAIN, RIM_ROOT, WHEN)


def test_chain_without_intermediates_fails() -> None:
    with pytest.raises(spdm.SpdmChainError):
        spdm.verify_chain([CHAIN[0]], DEVICE_ROOT, WHEN)
    with pytest.raises(spdm.SpdmChainError, match="no certificates"):
        spdm.verify_chain([], DEVICE_ROOT, WHEN)


def test_chain_before_validity_fails() -> None:
    with pytest.raises(spdm.SpdmChainError):
        spdm.verify_chain(CHAIN, DEVICE_ROOT, datetime(2019, 1, 1, tzinfo=UTC))


def test_every_truncation_is_a_named_format_error() -> None:
    for length in range(len(REPORT)):
        with pytest.raises(spdm.SpdmFormatError):
            spdm.parse_report(REPORT[:length])


def test_mutated_reports_parse_or_raise_format_errors_only() -> None:
    rng = random.Random(14)  # noqa: S311 - a reproducible mutation sequence, not a secret
    for _ in range(2000):
        data = bytearray(REPORT)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        with contextlib.suppress(spdm.SpdmFormatError):
            spdm.parse_report(bytes(data))


def test_repeated_measurement_index_is_named() -> None:
    at = RECORD_START + 55  # the second block's Index, set to 1
    broken = REPORT[:at] + b"\x01" + REPORT[at + 1 :]
    with pytest.raises(spdm.SpdmFormatError, match="index 1 once, found a repeat") as caught:
        spdm.parse_report(broken)
    assert caught.value.offset == at


def test_repeated_opaque_field_is_named() -> None:
    # The opaque data's second field (type 14, board id) retyped as 6, a second VBIOS version.
    at = RECORD_START + 3520 + 34 + 12
    assert REPORT[at : at + 2] == b"\x0e\x00"
    broken = REPORT[:at] + b"\x06\x00" + REPORT[at + 2 :]
    with pytest.raises(spdm.SpdmFormatError, match="field 6 once, found a repeat") as caught:
        spdm.parse_report(broken)
    assert caught.value.offset == at


# --- the FWID the attestation key's certificate declares (TCG DICE / RIoT) -----------------

SHA384 = bytes.fromhex("0609608648016503040202")  # OID 2.16.840.1.101.3.4.2.2
SHA256 = bytes.fromhex("0609608648016503040201")
_KEY = ec.generate_private_key(ec.SECP256R1())  # certificate_fwid reads; nothing verifies


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    return bytes([tag, 0x82]) + size.to_bytes(2, "big") + content


def _fwid(digest: bytes, oid: bytes = SHA384) -> bytes:
    return _der(0x30, oid + _der(0x04, digest))


def _tcb(*fwids: bytes) -> bytes:
    return _der(0x30, _der(0x80, b"vendor") + _der(0x83, b"\x05") + _der(0xA6, b"".join(fwids)))


def _leaf(*extensions: tuple[str, bytes]) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devtrust test FMC LF")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(1)
        .not_valid_before(WHEN)
        .not_valid_after(WHEN + timedelta(days=1))
    )
    for oid, value in extensions:
        extension = x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(_KEY, hashes.SHA256())


def test_recorded_leaf_declares_the_reports_fwid_in_riot_form() -> None:
    # NVIDIA's Hopper leaf: RIoT's CompositeDeviceID {version 1, deviceID (the issuing GSP
    # BROM's key), fwid} under 2.23.133.5.4.1; its FWID is the report's opaque field 20.
    declared = spdm.certificate_fwid(CHAIN[0])
    assert declared is not None
    assert declared.digest == spdm.parse_report(REPORT).response.opaque["fwid"]
    assert (declared.hash_alg, declared.hash_name) == ("2.16.840.1.101.3.4.2.2", "SHA-384")
    assert declared.source == "RIoT CompositeDeviceID (2.23.133.5.4.1)"
    assert all(spdm.certificate_fwid(cert) is None for cert in CHAIN[1:])


def test_dice_tcb_info_first_fwid_and_hash_names() -> None:
    first, second = bytes(range(32)), bytes(48)
    declared = spdm.certificate_fwid(
        _leaf(("2.23.133.5.4.1", _tcb(_fwid(first, SHA256), _fwid(second))))
    )
    assert declared == spdm.CertificateFwid(
        "2.16.840.1.101.3.4.2.1", first, "TCG DICE TcbInfo (2.23.133.5.4.1)"
    )
    assert declared.hash_name == "SHA-256"
    # An algorithm it does not know is named by its OID (1.3.6.1.4.1.99999.1), any size.
    unknown = bytes.fromhex("06092b06010401868d1f01")
    odd = spdm.certificate_fwid(_leaf(("2.23.133.5.4.1", _tcb(_fwid(b"\x01\x02", unknown)))))
    assert odd is not None
    assert (odd.hash_name, odd.digest) == ("1.3.6.1.4.1.99999.1", b"\x01\x02")


def test_tcb_info_is_read_before_multi_tcb_info() -> None:
    one, two = bytes([1]) * 48, bytes([2]) * 48
    multi = ("2.23.133.5.4.5", _der(0x30, _der(0x30, b"") + _tcb(_fwid(two))))
    declared = spdm.certificate_fwid(_leaf(multi))
    assert declared is not None
    assert declared.digest == two  # the first entry has no fwids: the next one's
    assert declared.source == "TCG DICE MultiTcbInfo (2.23.133.5.4.5) entry 1"
    both = spdm.certificate_fwid(_leaf(("2.23.133.5.4.1", _tcb(_fwid(one))), multi))
    assert both is not None
    assert both.digest == one


def test_no_dice_extension_is_none() -> None:
    assert spdm.certificate_fwid(_leaf()) is None
    assert spdm.certificate_fwid(_leaf(("2.23.133.5.4.2", _tcb(_fwid(bytes(48)))))) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(
            _der(0x30, _der(0xA6, _fwid(bytes(48)) * 17)), "at most 16 FWIDs", id="too-many-fwids"
        ),
        pytest.param(_der(0x30, _der(0x04, bytes(5000))), "at most 4096 bytes", id="too-large"),
        pytest.param(b"\x30\x83\x00\x00\x01\x00", "at most 2 bytes", id="long-length"),
        pytest.param(b"\x3f\x01\x00", "below 31", id="high-tag"),
        pytest.param(
            _der(0x30, _der(0xA6, _der(0x30, b"\x06\x02\x80\x01" + _der(0x04, bytes(48))))),
            "minimal subidentifiers",
            id="oid-padding",
        ),
    ],
)
def test_malformed_dice_extension_names_why(value: bytes, message: str) -> None:
    with pytest.raises(spdm.TcbInfoError, match=message) as caught:
        spdm.certificate_fwid(_leaf(("2.23.133.5.4.1", value)))
    assert "certificate CN=devtrust test FMC LF extension 2.23.133.5.4.1" in str(caught.value)
    assert isinstance(caught.value, MalformedInput)


def test_mutated_dice_extensions_raise_only_tcb_info_error() -> None:
    # Bounded and total: every truncation and random byte change of each form either reads
    # or is a TcbInfoError naming the spot; nothing else escapes.
    recorded = CHAIN[0].extensions.get_extension_for_oid(spdm.TCG_DICE_TCB_INFO).value
    seeds = [
        recorded.public_bytes(),
        _tcb(_fwid(bytes(48)), _fwid(bytes(32), SHA256)),
        _der(0x30, _tcb(_fwid(bytes(48)))),
    ]
    rng = random.Random(14)  # noqa: S311 - a reproducible mutation sequence, not a secret
    outcomes = {"read": 0, "refused": 0}
    messages: list[str] = []
    for seed in seeds:
        variants = [seed[:n] for n in range(len(seed))]
        for _ in range(400):
            data = bytearray(seed)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            variants.append(bytes(data))
        for variant in variants:
            for oid in (spdm.TCG_DICE_TCB_INFO, spdm.TCG_DICE_MULTI_TCB_INFO):
                try:
                    spdm.extension_fwid(oid, variant)
                except spdm.TcbInfoError as exc:
                    messages.append(str(exc))
                    outcomes["refused"] += 1
                else:
                    outcomes["read"] += 1
    assert outcomes["refused"] > 1000
    assert outcomes["read"] > 100
    assert all(" at offset " in message for message in messages)
