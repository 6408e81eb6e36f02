"""NVIDIA GPU attestation reports (issue 14, first slice): the recorded Hopper report from
nvtrust parses, its signature and certificate chain verify offline, and broken copies each
give their named error."""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime

import pytest
from cryptography import x509

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
