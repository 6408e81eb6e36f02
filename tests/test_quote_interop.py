"""`devtrust quote check` against tpm2_checkquote (tpm2-tools), on quotes made by tpm2_quote
against swtpm, and on the real quotes of the conformance corpus (tests/data/corpus/quotes).

Both tools must agree on every case, except where tpm2_checkquote does not check a property:
there devtrust is stricter, and the case says so (``stricter=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC, TPMT_SIG_SCHEME

from devtrust.agent.tpm import AK_ATTRIBUTES, TpmBackend
from devtrust.swtpm import Swtpm
from devtrust.verifier.tpm.structures import parse_signature
from tests import quotes
from tests.conftest import SwtpmFactory
from tests.corpus import corpus_root

pytestmark = pytest.mark.swtpm
NONCE = "c0ffee0123456789aabbccddeeff"
RSA_AK_HANDLE = 0x81010003
PCR16 = 16


def _devtrust(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtrust.verifier.cli", "quote", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _checkquote(
    ak_pem: Path, message: Path, signature: Path, pcrs: Path | None, nonce: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        "tpm2_checkquote",
        "-u",
        str(ak_pem),
        "-m",
        str(message),
        "-s",
        str(signature),
        "-q",
        nonce,
        "-g",
        "sha256",
    ]
    if pcrs is not None:
        cmd += ["-f", str(pcrs)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class Made:
    """One quote made by tpm2_quote, with everything both checkers need."""

    dir: Path
    ak_tpm2b: Path
    ak_pem: Path
    message: Path
    signature: Path
    pcrs_tools: Path  # tpm2_quote -o (tpm2-tools serialization)
    pcrs_json: Path  # the same values in `eventlog replay --json` shape
    pcr16: bytes


def _rsa_ak(backend: TpmBackend) -> bytes:
    public = TPMT_PUBLIC.parse("rsa2048:rsassa-sha256", objectAttributes=AK_ATTRIBUTES)
    public.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG.NULL
    e = backend.esapi
    handle, out, _, _, _ = e.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=public), ESYS_TR.ENDORSEMENT
    )
    e.evict_control(ESYS_TR.OWNER, handle, RSA_AK_HANDLE)
    e.flush_context(handle)
    return bytes(out.marshal())


@pytest.fixture(scope="module")
def interop_tpm(swtpm_factory: SwtpmFactory) -> Swtpm:
    return swtpm_factory()


@pytest.fixture(scope="module", params=["ecc", "rsa"])
def made(
    request: pytest.FixtureRequest, interop_tpm: Swtpm, tmp_path_factory: pytest.TempPathFactory
) -> Made:
    if shutil.which("tpm2_quote") is None:
        pytest.fail("tpm2-tools is required: `make test` installs it")
    d = tmp_path_factory.mktemp(f"quote-{request.param}")
    backend = TpmBackend(interop_tpm.tcti)
    try:
        if request.param == "ecc":
            ak_public, handle = backend.ak_public(), "0x81010002"
        else:
            ak_public, handle = _rsa_ak(backend), f"0x{RSA_AK_HANDLE:08x}"
        # PCR 16 gets a unique value, so a changed byte of it can be found in every format.
        backend.esapi.pcr_event(ESYS_TR.PCR16, os.urandom(32))
        values = backend.pcr_read([("sha256", [0, 1, 2, 7, PCR16]), ("sha1", [0, 7, PCR16])])
        # TPM2_Certify by the same AK, qualified with the same nonce: a genuine TPM
        # attestation, signed by this AK, that is not a quote.
        ak = backend.esapi.tr_from_tpmpublic(int(handle, 16))
        certify, certify_sig = backend.esapi.certify(
            ak, ak, bytes.fromhex(NONCE), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        )
    finally:
        backend.close()
    (d / "certify-msg").write_bytes(bytes(certify.attestationData))
    (d / "certify-sig").write_bytes(bytes(certify_sig.marshal()))
    made = Made(
        d,
        d / "ak.tpm2b",
        d / "ak.pem",
        d / "msg",
        d / "sig",
        d / "pcrs.out",
        d / "pcrs.json",
        values[("sha256", PCR16)],
    )
    made.ak_tpm2b.write_bytes(ak_public)
    env = {**os.environ, "TPM2TOOLS_TCTI": interop_tpm.tcti, "TSS2_LOG": "all+NONE"}
    subprocess.run(
        ["tpm2_readpublic", "-c", handle, "-f", "pem", "-o", str(made.ak_pem)],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "tpm2_quote",
            "-c",
            handle,
            "-l",
            f"sha256:0,1,2,7,{PCR16}+sha1:0,7,{PCR16}",
            "-q",
            NONCE,
            "-m",
            str(made.message),
            "-s",
            str(made.signature),
            "-o",
            str(made.pcrs_tools),
            "-g",
            "sha256",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    banks: dict[str, dict[str, str]] = {}
    for (bank, index), value in values.items():
        banks.setdefault(bank, {})[str(index)] = value.hex()
    made.pcrs_json.write_text(json.dumps({"banks": banks}))
    return made


def _flip(path: Path, out: Path, index: int) -> Path:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    out.write_bytes(bytes(data))
    return out


@dataclass
class Case:
    name: str
    valid: bool
    finding: str
    # (made) -> (ak_pem, ak_for_devtrust, message, signature, pcrs_tools, pcrs_json, nonce)
    prepare: Callable[[Made], tuple[Path, Path, Path, Path, Path | None, Path | None, str]]
    stricter: bool = False  # tpm2_checkquote does not check this property


def _same(m: Made) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    return m.ak_pem, m.ak_tpm2b, m.message, m.signature, m.pcrs_tools, m.pcrs_json, NONCE


def _changed_pcr(m: Made) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    tools = m.pcrs_tools.read_bytes()
    at = tools.index(m.pcr16)
    bad_tools = _flip(m.pcrs_tools, m.dir / "pcrs-changed.out", at + 3)
    doc = json.loads(m.pcrs_json.read_text())
    value = bytearray(bytes.fromhex(doc["banks"]["sha256"][str(PCR16)]))
    value[3] ^= 0x01
    doc["banks"]["sha256"][str(PCR16)] = value.hex()
    bad_json = m.dir / "pcrs-changed.json"
    bad_json.write_text(json.dumps(doc))
    return m.ak_pem, m.ak_tpm2b, m.message, m.signature, bad_tools, bad_json, NONCE


def _other_ak(m: Made) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    """A key of the same type as the AK, which did not sign."""
    ours = serialization.load_pem_public_key(m.ak_pem.read_bytes())
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if isinstance(ours, ec.EllipticCurvePublicKey)
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    pem = m.dir / "other-ak.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pem, pem, m.message, m.signature, m.pcrs_tools, m.pcrs_json, NONCE


def _zero_signature(m: Made) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    """The same TPMT_SIGNATURE layout with every signature byte zero."""
    sig = parse_signature(m.signature.read_bytes())
    head = struct.pack(">HH", sig.alg, sig.hash_alg)
    if sig.rsa_sig:
        body = quotes.tpm2b(bytes(len(sig.rsa_sig)))
    else:
        body = quotes.tpm2b(bytes(len(sig.ecc_r))) + quotes.tpm2b(bytes(len(sig.ecc_s)))
    zero = m.dir / "sig-zero"
    zero.write_bytes(head + body)
    return m.ak_pem, m.ak_tpm2b, m.message, zero, m.pcrs_tools, m.pcrs_json, NONCE


def _truncated(m: Made) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    short = m.dir / "msg-short"
    short.write_bytes(m.message.read_bytes()[:-7])
    return m.ak_pem, m.ak_tpm2b, short, m.signature, m.pcrs_tools, m.pcrs_json, NONCE


def _software_wrong_magic(m: Made) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    """A structure that is no TPM's (magic DEADBEEF), signed by a software key."""
    key = ec.generate_private_key(ec.SECP256R1())
    real = m.message.read_bytes()
    fake = b"\xde\xad\xbe\xef" + real[4:]
    msg, sig, pem = m.dir / "fake-msg", m.dir / "fake-sig", m.dir / "soft.pem"
    msg.write_bytes(fake)
    sig.write_bytes(quotes.ecdsa_signature(key, fake))
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pem, pem, msg, sig, m.pcrs_tools, m.pcrs_json, NONCE


def _software_certify(m: Made) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    """The quote's bytes relabelled TPM_ST_ATTEST_CERTIFY, signed by a software key."""
    key = ec.generate_private_key(ec.SECP256R1())
    real = m.message.read_bytes()
    fake = real[:4] + b"\x80\x17" + real[6:]
    msg, sig, pem = m.dir / "certify-msg", m.dir / "certify-sig", m.dir / "soft2.pem"
    msg.write_bytes(fake)
    sig.write_bytes(quotes.ecdsa_signature(key, fake))
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pem, pem, msg, sig, m.pcrs_tools, m.pcrs_json, NONCE


def _certify_by_same_ak(
    m: Made,
) -> tuple[Path, Path, Path, Path, Path | None, Path | None, str]:
    return (
        m.ak_pem,
        m.ak_tpm2b,
        m.dir / "certify-msg",
        m.dir / "certify-sig",
        m.pcrs_tools,
        m.pcrs_json,
        NONCE,
    )


CASES = [
    Case("valid", True, "", _same),
    Case("valid without PCR values", True, "", lambda m: (*_same(m)[:4], None, None, NONCE)),
    Case(
        "wrong nonce",
        False,
        "tpm.quote.qualifying_data_mismatch",
        lambda m: (*_same(m)[:6], "c0ffee"),
    ),
    Case("nonce in upper case", True, "", lambda m: (*_same(m)[:6], NONCE.upper())),
    Case(
        "bit flip in message",
        False,
        "tpm.quote.signature_invalid",
        lambda m: (
            m.ak_pem,
            m.ak_tpm2b,
            _flip(m.message, m.dir / "msg-flip", 30),
            m.signature,
            m.pcrs_tools,
            m.pcrs_json,
            NONCE,
        ),
    ),
    Case(
        "bit flip in signature",
        False,
        "tpm.quote.signature_invalid",
        lambda m: (
            m.ak_pem,
            m.ak_tpm2b,
            m.message,
            _flip(m.signature, m.dir / "sig-flip", 20),
            m.pcrs_tools,
            m.pcrs_json,
            NONCE,
        ),
    ),
    Case("all-zero signature", False, "tpm.quote.signature_invalid", _zero_signature),
    Case("PCR value changed", False, "tpm.quote.pcr_digest_mismatch", _changed_pcr),
    Case("another AK", False, "tpm.quote.signature_invalid", _other_ak),
    Case("truncated message", False, "tpm.quote.malformed", _truncated),
    Case(
        "wrong magic, software key",
        False,
        "tpm.quote.bad_magic",
        _software_wrong_magic,
        stricter=True,
    ),
    Case(
        "certify attestation by the same AK",
        False,
        "tpm.quote.wrong_type",
        _certify_by_same_ak,
    ),
    # tpm2_checkquote rejects this one too, though only because it then reads the attested
    # union as TPMS_CERTIFY_INFO and the PCR digest no longer matches.
    Case(
        "certify structure, software key",
        False,
        "tpm.quote.wrong_type",
        _software_certify,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_devtrust_agrees_with_tpm2_checkquote(made: Made, case: Case) -> None:
    ak_pem, ak_ours, message, signature, pcrs_tools, pcrs_json, nonce = case.prepare(made)
    args = [
        "--ak-pub",
        str(ak_ours),
        "--nonce",
        nonce,
        "--message",
        str(message),
        "--signature",
        str(signature),
    ]
    if pcrs_json is not None:
        args += ["--pcrs", str(pcrs_json)]
    ours = _devtrust(*args)
    theirs = _checkquote(ak_pem, message, signature, pcrs_tools, nonce.lower())
    assert "Traceback" not in ours.stderr
    assert ours.returncode == (0 if case.valid else 1), ours.stdout + ours.stderr
    assert len(ours.stdout.strip().splitlines()) == 1
    if not case.valid:
        assert ours.stdout.startswith(f"invalid: {case.finding}"), ours.stdout
    if case.stricter:
        # tpm2_checkquote 5.4 does not look at magic or type: it accepts these.
        assert theirs.returncode == 0, theirs.stderr
    else:
        assert (theirs.returncode == 0) == case.valid, theirs.stderr


def test_usage_errors_exit_2(made: Made, tmp_path: Path) -> None:
    base = [
        "--ak-pub",
        str(made.ak_tpm2b),
        "--message",
        str(made.message),
        "--signature",
        str(made.signature),
    ]
    for args in (
        [*base, "--nonce", "zz"],
        ["--ak-pub", str(tmp_path / "absent"), "--nonce", NONCE, *base[2:]],
        [*base, "--nonce", NONCE, "--pcrs", str(made.message)],
        ["--nonce", NONCE],
    ):
        result = _devtrust(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(200))
    result = _devtrust("--ak-pub", str(garbage), "--nonce", NONCE, *base[2:])
    assert result.returncode == 2
    assert "neither PEM nor TPM2B_PUBLIC" in result.stderr


# --- real quotes from real machines (tests/data/corpus/quotes) ---------------------------

CORPUS = corpus_root()
QUOTES = json.loads((CORPUS / "expected.json").read_text())["quotes"]
CORPUS_CASES = [
    (bundle, name)
    for bundle, qs in sorted(QUOTES.items())
    for name in sorted(qs)
    if not name.startswith("_")
]


@pytest.mark.parametrize(("bundle", "name"), CORPUS_CASES)
def test_corpus_quote(bundle: str, name: str, tmp_path: Path) -> None:
    root = CORPUS
    q = QUOTES[bundle][name]
    bank = next(iter(q["pcr_selection"]))
    flat = json.loads((root / q["pcr_values"]).read_text())
    pcrs = tmp_path / "pcrs.json"
    pcrs.write_text(json.dumps({"banks": {bank: flat}}))
    args = [
        "--ak-pub",
        str(root / q["ak_public"]),
        "--message",
        str(root / q["message"]),
        "--signature",
        str(root / q["signature"]),
        "--pcrs",
        str(pcrs),
    ]
    nonce = q["nonce_hex"]
    result = _devtrust(*args, "--nonce", nonce)
    if q["signature_hash"] == "sha1":
        # Valid for tpm2_checkquote, but devtrust allows SHA-256 and SHA-384 signatures only.
        assert result.returncode == 1
        assert result.stdout.startswith("invalid: tpm.quote.signature_hash")
        return
    assert result.returncode == 0, result.stdout
    wrong = _devtrust(*args, "--nonce", (nonce or "00") + "01")
    assert wrong.stdout.startswith("invalid: tpm.quote.qualifying_data_mismatch")
    flat[next(iter(flat))] = "00" * (len(next(iter(flat.values()))) // 2)
    pcrs.write_text(json.dumps({"banks": {bank: flat}}))
    changed = _devtrust(*args, "--nonce", nonce)
    assert changed.stdout.startswith("invalid: tpm.quote.pcr_digest_mismatch")
