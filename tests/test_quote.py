"""Quote verification (verifier.tpm.quote): every check has a case that fails without it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.swtpm import Swtpm
from devtrust.v1 import attestation_pb2
from devtrust.verifier.errors import MalformedInput
from devtrust.verifier.tpm.constants import ST_ATTEST_CERTIFY, Alg
from devtrust.verifier.tpm.quote import QuoteRejected, check_quote
from devtrust.verifier.tpm.structures import (
    PcrSelect,
    ak_qualified_names,
    parse_attest,
    parse_public,
)
from tests import quotes

SHA256 = Alg.SHA256
SELECTION = (PcrSelect(SHA256, (0, 1, 7)),)
VALUES = {(SHA256, 0): b"\x00" * 32, (SHA256, 1): b"\x11" * 32, (SHA256, 7): b"\x77" * 32}
EXTRA = hashlib.sha256(b"nonce and body").digest()
KEY = ec.generate_private_key(ec.SECP256R1())


def _quote(**overrides: Any) -> tuple[bytes, bytes]:
    args: dict[str, Any] = {
        "extra": EXTRA,
        "selection": SELECTION,
        "digest": quotes.digest_of([VALUES[(SHA256, i)] for i in (0, 1, 7)]),
    }
    hash_alg = overrides.pop("sig_hash", SHA256)
    args.update(overrides)
    message = quotes.attest(**args)
    return message, quotes.ecdsa_signature(KEY, message, hash_alg=hash_alg)


def _check(message: bytes, signature: bytes, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "attest_bytes": message,
        "signature_bytes": signature,
        "ak_key": KEY.public_key(),
        "expected_qualifying_data": EXTRA,
        "requested": SELECTION,
        "pcr_values": VALUES,
    }
    kwargs.update(overrides)
    return check_quote(**kwargs)


def test_a_good_quote_passes() -> None:
    attest = _check(*_quote(), qualified_signers={b"\x00\x0b" + bytes(32)})
    assert attest.extra_data == EXTRA
    assert attest.pcr_select == SELECTION


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


Case = Callable[[], tuple[bytes, bytes, dict[str, Any]]]
CASES: dict[str, tuple[Case, str]] = {
    "wrong nonce": (lambda: (*_quote(extra=bytes(32)), {}), "tpm.quote.qualifying_data_mismatch"),
    "bit flip in message": (
        lambda: (_flip(_quote()[0], 40), _quote()[1], {}),
        "tpm.quote.signature_invalid",
    ),
    "bit flip in signature": (
        lambda: (_quote()[0], _flip(_quote()[1], 10), {}),
        "tpm.quote.signature_invalid",
    ),
    "all-zero signature": (
        lambda: (_quote()[0], quotes.ecdsa_zero(), {}),
        "tpm.quote.signature_invalid",
    ),
    "another key": (
        lambda: (*_quote(), {"ak_key": ec.generate_private_key(ec.SECP256R1()).public_key()}),
        "tpm.quote.signature_invalid",
    ),
    "wrong magic": (lambda: (*_quote(magic=0xDEADBEEF), {}), "tpm.quote.bad_magic"),
    "certify, not quote": (lambda: (*_quote(type_=ST_ATTEST_CERTIFY), {}), "tpm.quote.wrong_type"),
    "PCR value changed": (
        lambda: (*_quote(), {"pcr_values": {**VALUES, (SHA256, 7): b"\x78" * 32}}),
        "tpm.quote.pcr_digest_mismatch",
    ),
    "selection differs": (
        lambda: (*_quote(), {"requested": (PcrSelect(SHA256, (0, 1)),)}),
        "tpm.quote.selection_mismatch",
    ),
    "PCR value missing": (
        lambda: (*_quote(), {"pcr_values": {k: v for k, v in VALUES.items() if k != (SHA256, 1)}}),
        "tpm.quote.pcr_values_missing",
    ),
    "another qualified signer": (
        lambda: (*_quote(), {"qualified_signers": {b"\x00\x0b" + b"\x01" * 32}}),
        "tpm.quote.qualified_signer",
    ),
    "SHA-1 signature": (lambda: (*_quote(sig_hash=Alg.SHA1), {}), "tpm.quote.signature_hash"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tampering_is_rejected(name: str) -> None:
    make, finding = CASES[name]
    message, signature, overrides = make()
    with pytest.raises(QuoteRejected) as rejected:
        _check(message, signature, **overrides)
    assert rejected.value.finding_id == finding


@pytest.mark.parametrize("cut", [0, 5, 40, 80])
def test_truncated_attest_is_malformed_with_offset(cut: int) -> None:
    message, signature = _quote()
    with pytest.raises(MalformedInput, match=r"TPMS_ATTEST: truncated at byte \d+"):
        _check(message[:cut], signature)


def test_trailing_bytes_are_malformed() -> None:
    message, signature = _quote()
    with pytest.raises(MalformedInput, match="unexpected bytes after the structure"):
        parse_attest(message + b"\x00")
    _ = signature


# --- against a real TPM -------------------------------------------------------------------


@pytest.mark.swtpm
def test_real_quote_verifies_and_ak_name_matches_the_tpm(shared_swtpm: Swtpm) -> None:
    from devtrust.agent.tpm import TpmBackend

    backend = TpmBackend(shared_swtpm.tcti)
    try:
        ak_public = backend.ak_public()
        ek = backend.ek_public()
        handle, _ = backend._load_ak()
        tpm_name = bytes(backend.esapi.tr_get_name(handle))
        selection = [("sha256", [0, 1, 2, 3, 7]), ("sha1", [0, 7])]
        message, signature, values = backend.quote(EXTRA, selection)
    finally:
        backend.close()
    ak = parse_public(ak_public)
    assert ak.name == tpm_name
    assert parse_attest(message).qualified_signer in ak_qualified_names(ak, parse_public(ek))
    pcrs: dict[tuple[int, int], bytes] = {
        (Alg.SHA256 if b == "sha256" else Alg.SHA1, i): v for (b, i), v in values.items()
    }
    requested = (PcrSelect(Alg.SHA256, (0, 1, 2, 3, 7)), PcrSelect(Alg.SHA1, (0, 7)))
    attest = check_quote(
        attest_bytes=message,
        signature_bytes=signature,
        ak_key=ak.public_key(),
        expected_qualifying_data=EXTRA,
        requested=requested,
        pcr_values=pcrs,
    )
    assert attest.pcr_select == requested
    with pytest.raises(QuoteRejected) as rejected:
        check_quote(
            attest_bytes=message,
            signature_bytes=signature,
            ak_key=ak.public_key(),
            expected_qualifying_data=EXTRA,
            requested=requested,
            pcr_values={**pcrs, (Alg.SHA1, 7): b"\x01" * 20},
        )
    assert rejected.value.finding_id == "tpm.quote.pcr_digest_mismatch"


@pytest.mark.parametrize(
    ("name", "evidence", "message"),
    [
        ("short nonce", {"nonce": b"n" * 16}, "Evidence.nonce: expected 32 bytes, got 16"),
        ("no quote", {"quote_signature": b""}, "quote_attest and quote_signature are required"),
        (
            "PCR of the wrong size",
            {"pcrs": [{"hash_alg": "sha256", "values": {7: b"\x00" * 20}}]},
            "sha256:7: expected a PCR index 0..23 and 32 bytes, got 20 bytes",
        ),
        (
            "PCR index out of range",
            {"pcrs": [{"hash_alg": "sha1", "values": {24: b"\x00" * 20}}]},
            "expected a PCR index 0..23",
        ),
        (
            "unknown bank",
            {"pcrs": [{"hash_alg": "md5", "values": {}}]},
            "unsupported hash algorithm 'md5'",
        ),
        (
            "a bank twice (the second would silently replace the first)",
            {"pcrs": [{"hash_alg": "sha256", "values": {}}, {"hash_alg": "sha256", "values": {}}]},
            "Evidence.pcrs[1]: bank sha256 is reported twice",
        ),
        (
            "one GPU index twice (GPU results are keyed by index)",
            {
                "body": attestation_pb2.EvidenceBody(
                    gpu=attestation_pb2.GpuState(
                        gpus=[attestation_pb2.Gpu(index=3), attestation_pb2.Gpu(index=3)]
                    )
                ).SerializeToString()
            },
            "EvidenceBody.gpu.gpus[1]: GPU index 3 is reported twice",
        ),
        (
            "body not an EvidenceBody",
            {"body": b"\xff\xff\xff"},
            "Evidence.body: not an EvidenceBody",
        ),
    ],
)
def test_malformed_evidence_is_refused_at_the_edge(
    name: str, evidence: dict[str, Any], message: str
) -> None:
    from devtrust.v1 import attestation_pb2, common_pb2
    from devtrust.verifier.config import LimitsConfig
    from devtrust.verifier.wire import evidence_from_wire

    fields: dict[str, Any] = {
        "nonce": b"n" * 32,
        "quote_attest": b"a",
        "quote_signature": b"s",
        "body": b"",
    }
    fields.update(evidence)
    pcrs = [common_pb2.PcrBank(**bank) for bank in fields.pop("pcrs", [])]
    msg = attestation_pb2.Evidence(pcrs=pcrs, **fields)
    with pytest.raises(MalformedInput, match=re.escape(message)):
        evidence_from_wire(msg, LimitsConfig())
    _ = name
