"""The in-process soft TPM (devtrust.swtpm.soft) against tpm2-pytss's unmarshalling and
templates, the verifier's own parsers and checks, and a real swtpm given the same boot."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST
from tpm2_pytss.internal.crypto import _encrypt, _hmac, _kdfa, kdfe
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE
from tpm2_pytss.utils import create_ek_template, make_credential

from devtrust.agent.errors import TpmError
from devtrust.agent.interfaces import Quote, Tpm
from devtrust.agent.tpm import ak_template
from devtrust.swtpm.simroot import (
    COMMON_NAME,
    TCG_KP_EK_CERTIFICATE,
    TCG_TPM_MANUFACTURER,
    SimulationRoot,
    SimulationRootError,
)
from devtrust.swtpm.soft import EK_AUTH_POLICY, SoftTpm
from devtrust.verifier.endorsement import EndorsementStore
from devtrust.verifier.enrollment import (
    check_ak,
    check_ek_public,
    make_challenge,
    parse_ak,
)
from devtrust.verifier.errors import Rejected
from devtrust.verifier.tpm.constants import Alg
from devtrust.verifier.tpm.quote import QuoteRejected, check_quote
from devtrust.verifier.tpm.structures import PcrSelect, ak_qualified_names, parse_public

DEFAULT_PCRS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14]
SELECTION = [("sha256", DEFAULT_PCRS)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> SimulationRoot:
    return SimulationRoot.create(tmp_path_factory.mktemp("sim-root"))


@pytest.fixture(scope="module")
def tpm(root: SimulationRoot) -> SoftTpm:
    return SoftTpm(root)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _tpm_interface(tpm: Tpm) -> Tpm:
    return tpm


# --- the module stands alone -----------------------------------------------------------------


def test_soft_tpm_loads_no_tpm2_pytss() -> None:
    code = (
        "import sys, devtrust.swtpm.soft, devtrust.swtpm.simroot;"
        "print(sorted(m for m in sys.modules if m.startswith('tpm2_pytss')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_soft_tpm_is_a_tpm(tpm: SoftTpm) -> None:
    assert _tpm_interface(tpm) is tpm  # mypy checks the protocol


# --- endorsement key and certificate -------------------------------------------------------


def test_ek_public_is_template_l2_as_tpm2_pytss_makes_it(tpm: SoftTpm) -> None:
    raw = run(tpm.ek_public())
    public, used = TPM2B_PUBLIC.unmarshal(raw)
    assert used == len(raw)
    area = public.publicArea
    assert area.type == TPM2_ALG.ECC
    assert bytes(area.authPolicy) == EK_AUTH_POLICY
    assert len(bytes(area.unique.ecc.x)) == 32
    assert len(bytes(area.unique.ecc.y)) == 32

    def no_nv(index: int) -> bytes:
        from tpm2_pytss.utils import NoSuchIndex

        raise NoSuchIndex(index)

    _, template = create_ek_template("EK-ECC256", no_nv)
    area.unique.ecc.x = b"\x00" * 32
    area.unique.ecc.y = b"\x00" * 32
    assert bytes(public.marshal()) == bytes(template.marshal())


def test_ek_certificate_chains_to_the_root_only(tpm: SoftTpm, root: SimulationRoot) -> None:
    der = run(tpm.ek_certificate())
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    now = datetime.datetime.now(datetime.UTC)
    chain = EndorsementStore.from_paths([root.cert_path]).verify(cert, [], now=now)
    assert chain[-1] == root.certificate
    # The verifier's EK checks: the certificate's key is the EK of the public area.
    ek_area = parse_public(run(tpm.ek_public()))
    check_ek_public(ek_area, cert)
    other = SoftTpm(root)
    with pytest.raises(Rejected, match="does not hold the key of the EK certificate"):
        check_ek_public(parse_public(run(other.ek_public())), cert)
    # TCG EK Credential Profile: empty subject, critical SAN of TPM attributes, the EKU.
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    [directory] = san.value.get_values_for_type(x509.DirectoryName)
    assert directory.get_attributes_for_oid(TCG_TPM_MANUFACTURER)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [TCG_KP_EK_CERTIFICATE]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_ek_certificate_from_another_root_is_rejected(
    tpm: SoftTpm, tmp_path: Path, root: SimulationRoot
) -> None:
    stranger = SimulationRoot.create(tmp_path / "other")
    der = run(tpm.ek_certificate())
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    store = EndorsementStore.from_paths([stranger.cert_path])
    with pytest.raises(Rejected, match="does not chain to a trusted endorsement root"):
        store.verify(cert, [], now=datetime.datetime.now(datetime.UTC))


def test_simulation_root_saves_and_loads(tmp_path: Path) -> None:
    made = SimulationRoot.create(tmp_path / "root")
    [cn] = made.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == COMMON_NAME
    assert made.key_path.stat().st_mode & 0o777 == 0o600
    loaded = SimulationRoot.load(tmp_path / "root")
    assert loaded.certificate == made.certificate
    # EK certificates a loaded root issues chain to the saved certificate.
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = x509.load_der_x509_certificate(loaded.issue_ek_certificate(key))
    EndorsementStore.from_paths([made.cert_path]).verify(
        cert, [], now=datetime.datetime.now(datetime.UTC)
    )


def test_simulation_root_refuses_a_key_of_another_root(tmp_path: Path) -> None:
    SimulationRoot.create(tmp_path / "a")
    other = SimulationRoot.create(tmp_path / "b")
    (tmp_path / "a" / other.key_path.name).write_bytes(other.key_path.read_bytes())
    with pytest.raises(SimulationRootError, match="is not the key of"):
        SimulationRoot.load(tmp_path / "a")
    with pytest.raises(SimulationRootError, match="No such file"):
        SimulationRoot.load(tmp_path / "missing")


def test_seed_derives_the_same_keys(root: SimulationRoot) -> None:
    a, b, c = SoftTpm(root, seed=b"one"), SoftTpm(root, seed=b"one"), SoftTpm(root, seed=b"two")
    assert run(a.ek_public()) == run(b.ek_public()) != run(c.ek_public())
    assert run(a.ak_public()) == run(b.ak_public()) != run(c.ak_public())
    assert run(a.ek_public()) != run(a.ak_public())


# --- attestation key -------------------------------------------------------------------------


def test_ak_public_is_the_agents_template(tpm: SoftTpm) -> None:
    raw = run(tpm.ak_public())
    public, used = TPM2B_PUBLIC.unmarshal(raw)
    assert used == len(raw)
    ak = parse_ak(raw)
    check_ak(ak)  # the verifier's AK checks
    assert ak.name == bytes(public.get_name().marshal())[2:]
    public.publicArea.unique.ecc.x = b""
    public.publicArea.unique.ecc.y = b""
    assert bytes(public.marshal()) == bytes(ak_template().marshal())


# --- TPM2_ActivateCredential -----------------------------------------------------------------


def _names(tpm: SoftTpm) -> tuple[bytes, bytes]:
    ek, ak = run(tpm.ek_public()), run(tpm.ak_public())
    return ek, parse_ak(ak).name


def test_credential_round_trips_through_the_verifiers_make_challenge(tpm: SoftTpm) -> None:
    ek, ak_name = _names(tpm)
    challenge = make_challenge(ek, ak_name)
    secret = run(tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret))
    assert secret == challenge.secret


def test_credential_for_another_ek_fails(tpm: SoftTpm, root: SimulationRoot) -> None:
    other_ek, _ = _names(SoftTpm(root))
    _, ak_name = _names(tpm)
    challenge = make_challenge(other_ek, ak_name)
    with pytest.raises(TpmError, match="TPM_RC_INTEGRITY"):
        run(tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret))


def test_credential_for_another_ak_name_fails(tpm: SoftTpm, root: SimulationRoot) -> None:
    ek, _ = _names(tpm)
    _, other_ak = _names(SoftTpm(root))
    challenge = make_challenge(ek, other_ak)
    with pytest.raises(TpmError, match="TPM_RC_INTEGRITY"):
        run(tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret))


def test_tampered_credential_fails_its_integrity_check(tpm: SoftTpm) -> None:
    ek, ak_name = _names(tpm)
    challenge = make_challenge(ek, ak_name)
    blob = bytearray(challenge.credential_blob)
    blob[-1] ^= 1  # a bit of encIdentity
    with pytest.raises(TpmError, match="TPM_RC_INTEGRITY"):
        run(tpm.activate_credential(bytes(blob), challenge.encrypted_secret))


def test_encrypted_secret_off_the_curve_fails(tpm: SoftTpm) -> None:
    ek, ak_name = _names(tpm)
    challenge = make_challenge(ek, ak_name)
    secret = bytearray(challenge.encrypted_secret)
    secret[-1] ^= 1  # y of the ephemeral point
    with pytest.raises(TpmError, match="TPM_RC_ECC_POINT"):
        run(tpm.activate_credential(challenge.credential_blob, bytes(secret)))


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _grown(secret: bytes) -> bytes:
    """The TPM2B_ENCRYPTED_SECRET with one more byte inside, after the TPMS_ECC_POINT."""
    return _sized(secret[2:] + b"\x00")


def _long_x(secret: bytes) -> bytes:
    """The same point with x one byte longer than the curve's (a leading zero)."""
    x, y = secret[4:36], secret[38:70]
    return _sized(_sized(b"\x00" + x) + _sized(y))


def _short_integrity(blob: bytes) -> bytes:
    """The TPM2B_ID_OBJECT with an integrityHMAC of 31 bytes (and encIdentity as it was)."""
    return _sized(_sized(blob[4:35]) + blob[36:])


def _no_identity(blob: bytes) -> bytes:
    """The TPM2B_ID_OBJECT with its integrityHMAC only."""
    return _sized(blob[2:36])


@pytest.mark.parametrize(
    ("name", "mangle", "code"),
    [
        ("secret truncated", lambda b, s: (b, s[:-1]), "TPM_RC_INSUFFICIENT"),
        ("secret with a trailing byte", lambda b, s: (b, s + b"\x00"), "TPM_RC_SIZE"),
        ("point with bytes after y", lambda b, s: (b, _grown(s)), "TPM_RC_SIZE"),
        ("x longer than the curve's", lambda b, s: (b, _long_x(s)), "TPM_RC_SIZE"),
        ("blob truncated", lambda b, s: (b[:-1], s), "TPM_RC_INSUFFICIENT"),
        ("blob empty", lambda b, s: (b"", s), "TPM_RC_INSUFFICIENT"),
        ("integrity HMAC short", lambda b, s: (_short_integrity(b), s), "TPM_RC_SIZE"),
        ("no encIdentity", lambda b, s: (_no_identity(b), s), "TPM_RC_SIZE"),
    ],
)
def test_malformed_credential_structures_fail(
    tpm: SoftTpm, name: str, mangle: Any, code: str
) -> None:
    ek, ak_name = _names(tpm)
    challenge = make_challenge(ek, ak_name)
    blob, secret = mangle(challenge.credential_blob, challenge.encrypted_secret)
    with pytest.raises(TpmError, match=code):
        run(tpm.activate_credential(blob, secret))


def _credential_with(tpm: SoftTpm, plaintext: bytes) -> tuple[bytes, bytes]:
    """MakeCredential (tpm2-pytss's primitives) over an arbitrary decrypted area: a valid
    HMAC around plaintext that is not a proper TPM2B_DIGEST."""
    ek, ak_name = _names(tpm)
    area = parse_public(ek)
    ek_key = area.public_key()
    assert isinstance(ek_key, ec.EllipticCurvePublicKey)
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    z = ephemeral.exchange(ec.ECDH(), ek_key)
    ex = ephemeral.public_key().public_numbers().x.to_bytes(32, "big")
    ey = ephemeral.public_key().public_numbers().y.to_bytes(32, "big")
    seed = kdfe(TPM2_ALG.SHA256, z, b"IDENTITY\x00", ex, area.ecc_x, 256)
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import algorithms

    key = _kdfa(TPM2_ALG.SHA256, seed, b"STORAGE", ak_name, b"", 128)
    enc = _encrypt(algorithms.AES, CFB, key, plaintext)
    hmac_key = _kdfa(TPM2_ALG.SHA256, seed, b"INTEGRITY", b"", b"", 256)
    integrity = _hmac(hashes.SHA256, hmac_key, enc, ak_name)
    inner = struct.pack(">H", 32) + integrity + enc
    point = struct.pack(">H", 32) + ex + struct.pack(">H", 32) + ey
    return struct.pack(">H", len(inner)) + inner, struct.pack(">H", len(point)) + point


def test_independent_make_credential_round_trips(tpm: SoftTpm) -> None:
    blob, secret = _credential_with(tpm, struct.pack(">H", 5) + b"hello")
    assert run(tpm.activate_credential(blob, secret)) == b"hello"


@pytest.mark.parametrize(
    ("name", "plaintext"),
    [
        ("digest larger than TPMU_HA", struct.pack(">H", 65) + bytes(65)),
        ("bytes after the digest", struct.pack(">H", 2) + b"ab" + b"c"),
        ("size past the end", struct.pack(">H", 9) + b"abc"),
    ],
)
def test_decrypted_credential_must_be_one_tpm2b_digest(
    tpm: SoftTpm, name: str, plaintext: bytes
) -> None:
    blob, secret = _credential_with(tpm, plaintext)
    with pytest.raises(TpmError, match=r"TPM_RC_SIZE|TPM_RC_INSUFFICIENT"):
        run(tpm.activate_credential(blob, secret))


def test_make_credential_of_tpm2_pytss_for_the_ak_name_it_reports(tpm: SoftTpm) -> None:
    ek_public, _ = TPM2B_PUBLIC.unmarshal(run(tpm.ek_public()))
    ak_public, _ = TPM2B_PUBLIC.unmarshal(run(tpm.ak_public()))
    name = TPM2B_NAME(bytes(ak_public.get_name().marshal())[2:])
    blob, secret = make_credential(ek_public, b"x" * 20, name)
    out = run(tpm.activate_credential(bytes(blob.marshal()), bytes(secret.marshal())))
    assert out == b"x" * 20


# --- TPM2_Quote ------------------------------------------------------------------------------


def _by_alg(values: Mapping[tuple[str, int], bytes]) -> dict[tuple[int, int], bytes]:
    algs = {"sha1": int(Alg.SHA1), "sha256": int(Alg.SHA256)}
    return {(algs[bank], index): value for (bank, index), value in values.items()}


def _requested(selection: list[tuple[str, list[int]]]) -> tuple[PcrSelect, ...]:
    algs = {"sha1": int(Alg.SHA1), "sha256": int(Alg.SHA256)}
    return tuple(PcrSelect(algs[bank], tuple(pcrs)) for bank, pcrs in selection)


def test_quote_unmarshals_as_a_tpm_quote(tpm: SoftTpm) -> None:
    quote: Quote = run(tpm.quote(b"q" * 32, SELECTION))
    attest, used = TPMS_ATTEST.unmarshal(quote.attest)
    assert used == len(quote.attest)
    assert attest.magic == 0xFF544347
    assert attest.type == TPM2_ST.ATTEST_QUOTE
    assert bytes(attest.extraData) == b"q" * 32
    assert attest.clockInfo.safe == 1
    assert attest.clockInfo.resetCount == tpm.reset_count
    [sel] = list(attest.attested.quote.pcrSelect)
    assert sel.hash == TPM2_ALG.SHA256
    expected = hashlib.sha256(b"".join(quote.pcrs[("sha256", i)] for i in DEFAULT_PCRS))
    assert bytes(attest.attested.quote.pcrDigest) == expected.digest()
    signature, used = TPMT_SIGNATURE.unmarshal(quote.signature)
    assert used == len(quote.signature)
    assert signature.sigAlg == TPM2_ALG.ECDSA
    assert signature.signature.ecdsa.hash == TPM2_ALG.SHA256
    assert set(quote.pcrs) == {("sha256", i) for i in DEFAULT_PCRS}


def test_quote_passes_the_verifiers_checks(tpm: SoftTpm, root: SimulationRoot) -> None:
    selection = [("sha256", DEFAULT_PCRS), ("sha1", [0, 7])]
    quote = run(tpm.quote(b"n" * 32, selection))
    ak, ek = parse_ak(run(tpm.ak_public())), parse_public(run(tpm.ek_public()))
    attest = check_quote(
        attest_bytes=quote.attest,
        signature_bytes=quote.signature,
        ak_key=ak.public_key(),
        expected_qualifying_data=b"n" * 32,
        requested=_requested(selection),
        pcr_values=_by_alg(quote.pcrs),
        qualified_signers=ak_qualified_names(ak, ek),
    )
    assert attest.firmware_version != 0
    # Another TPM's AK does not verify it.
    other = parse_ak(run(SoftTpm(root).ak_public()))
    with pytest.raises(QuoteRejected, match="does not verify with the enrolled AK"):
        check_quote(
            attest_bytes=quote.attest,
            signature_bytes=quote.signature,
            ak_key=other.public_key(),
            expected_qualifying_data=b"n" * 32,
            requested=_requested(selection),
            pcr_values=_by_alg(quote.pcrs),
        )


@pytest.mark.parametrize(
    ("name", "selection", "message"),
    [
        ("unknown bank", [("sha384", [0])], "no PCR bank 'sha384'"),
        ("index past the bank", [("sha256", [0, 24])], "no PCR 24"),
        ("negative index", [("sha1", [-1])], "no PCR -1"),
    ],
)
def test_selection_the_tpm_lacks_fails(
    tpm: SoftTpm, name: str, selection: list[tuple[str, list[int]]], message: str
) -> None:
    with pytest.raises(TpmError, match=message):
        run(tpm.quote(b"n", selection))
    with pytest.raises(TpmError, match=message):
        run(tpm.pcr_read(selection))


def test_oversized_qualifying_data_fails(tpm: SoftTpm) -> None:
    run(tpm.quote(b"x" * 66, SELECTION))
    with pytest.raises(TpmError, match="TPM_RC_SIZE"):
        run(tpm.quote(b"x" * 67, SELECTION))
