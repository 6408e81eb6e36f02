"""Revocation from the operator's CRLs and OCSP responses (verifier/gpu/revocation.py): each
counts only when signed by the certificate's issuer (or, for OCSP, a responder the issuer
delegated), matched by serial and issuer; age and staleness; bad files named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtrust.core.errors import ConfigError
from devtrust.verifier.gpu.revocation import (
    MAX_FILE_BYTES,
    Revocations,
    RevocationState,
    RevocationStatus,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)
DAY = timedelta(days=1)
MAX_AGE = timedelta(days=7)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 365 * DAY)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


CA_KEY = _key()
CA = _cert("test GPU ICA", CA_KEY, None, CA_KEY, ca=True)
LEAF_KEY = _key()
LEAF = _cert("test GPU attestation key", LEAF_KEY, CA, CA_KEY)
OTHER_LEAF = _cert("another GPU", _key(), CA, CA_KEY)


def crl(
    revoked: list[int],
    *,
    key: ec.EllipticCurvePrivateKey = CA_KEY,
    issuer: x509.Name = CA.subject,
    this_update: datetime = NOW - DAY,
    next_update: datetime | None = None,
    pem: bool = False,
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(this_update)
        .next_update(next_update or this_update + 30 * DAY)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update - DAY)
            .build()
        )
    signed = builder.sign(key, hashes.SHA384())
    return signed.public_bytes(Encoding.PEM if pem else Encoding.DER)


def ocsp_response(
    status: ocsp.OCSPCertStatus,
    *,
    cert: x509.Certificate = LEAF,
    issuer: x509.Certificate = CA,
    signer: x509.Certificate = CA,
    signer_key: ec.EllipticCurvePrivateKey = CA_KEY,
    carry: list[x509.Certificate] | None = None,
    this_update: datetime = NOW - DAY,
    next_update: datetime | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    revoked = status is ocsp.OCSPCertStatus.REVOKED
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=issuer,
            algorithm=algorithm or hashes.SHA1(),  # noqa: S303 - RFC 6960 CertID default
            cert_status=status,
            this_update=this_update,
            next_update=next_update or this_update + 3 * DAY,
            revocation_time=this_update - DAY if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, signer)
    )
    if carry:
        builder = builder.certificates(carry)
    return builder.sign(signer_key, hashes.SHA384()).public_bytes(Encoding.DER)


def status(
    *files: tuple[str, bytes], cert: x509.Certificate = LEAF, max_age: timedelta = MAX_AGE
) -> RevocationStatus:
    return Revocations.from_files(files).status(cert, CA, NOW, max_age)


# --- CRLs ------------------------------------------------------------------------------------


def test_crl_revokes_by_serial() -> None:
    got = status(("ica.crl", crl([LEAF.serial_number])))
    assert got.state is RevocationState.REVOKED
    assert got.source == "ica.crl"
    assert got.age == DAY
    assert "revoked at" in got.detail


def test_crl_without_the_serial_is_good() -> None:
    got = status(("ica.crl", crl([OTHER_LEAF.serial_number])))
    assert (got.state, got.stale, got.age) == (RevocationState.GOOD, False, DAY)


def test_pem_crl() -> None:
    got = status(("ica.pem", crl([LEAF.serial_number], pem=True)))
    assert got.state is RevocationState.REVOKED


def test_crl_signed_by_another_key_is_ignored() -> None:
    got = status(("forged.crl", crl([], key=_key())))
    assert got.state is RevocationState.UNKNOWN
    assert "forged.crl" in got.detail
    assert "signature does not verify" in got.detail


def test_forged_good_crl_does_not_hide_a_revocation() -> None:
    # A newer "good" CRL that does not verify must not win over the real one.
    got = status(
        ("real.crl", crl([LEAF.serial_number])),
        ("forged.crl", crl([], key=_key(), this_update=NOW - timedelta(minutes=1))),
    )
    assert got.state is RevocationState.REVOKED


def test_checked_signatures_are_remembered_per_issuer_key() -> None:
    revocations = Revocations.from_files([("ica.crl", crl([]))])
    assert revocations.status(LEAF, CA, NOW, MAX_AGE).state is RevocationState.GOOD
    # An impostor CA of the same name: the CRL, already found good for the real one, is
    # checked again with the impostor's key, and does not verify.
    impostor_key = _key()
    impostor = _cert("test GPU ICA", impostor_key, None, impostor_key, ca=True)
    leaf = _cert("test GPU attestation key", _key(), impostor, impostor_key)
    got = revocations.status(leaf, impostor, NOW, MAX_AGE)
    assert got.state is RevocationState.UNKNOWN


def test_crl_of_another_issuer_says_nothing() -> None:
    got = status(("other.crl", crl([LEAF.serial_number], issuer=_name("someone else"))))
    assert got.state is RevocationState.UNKNOWN


def test_crl_from_the_future_is_ignored() -> None:
    got = status(("future.crl", crl([], this_update=NOW + DAY)))
    assert got.state is RevocationState.UNKNOWN
    assert "after now" in got.detail


def test_old_crl_is_stale() -> None:
    got = status(("old.crl", crl([], this_update=NOW - 10 * DAY)))
    assert (got.state, got.stale, got.age) == (RevocationState.GOOD, True, 10 * DAY)


def test_crl_past_its_next_update_is_stale() -> None:
    got = status(("late.crl", crl([], this_update=NOW - 2 * DAY, next_update=NOW - DAY)))
    assert (got.state, got.stale) == (RevocationState.GOOD, True)


def test_freshest_good_answer_is_used() -> None:
    got = status(
        ("old.crl", crl([], this_update=NOW - 10 * DAY)),
        ("new.crl", crl([], this_update=NOW - DAY)),
    )
    assert (got.source, got.stale) == ("new.crl", False)


def test_revoked_wins_over_a_newer_good() -> None:
    got = status(
        ("old.crl", crl([LEAF.serial_number], this_update=NOW - 3 * DAY)),
        ("good.ocsp", ocsp_response(ocsp.OCSPCertStatus.GOOD)),
    )
    assert (got.state, got.source) == (RevocationState.REVOKED, "old.crl")


# --- OCSP ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cert_status", "state"),
    [
        (ocsp.OCSPCertStatus.GOOD, RevocationState.GOOD),
        (ocsp.OCSPCertStatus.REVOKED, RevocationState.REVOKED),
        (ocsp.OCSPCertStatus.UNKNOWN, RevocationState.UNKNOWN),
    ],
)
def test_ocsp_by_the_issuer(cert_status: ocsp.OCSPCertStatus, state: RevocationState) -> None:
    got = status(("leaf.ocsp", ocsp_response(cert_status)))
    assert got.state is state
    if state is RevocationState.REVOKED:
        assert "key_compromise" in got.detail


def test_ocsp_cert_id_with_sha256() -> None:
    got = status(
        ("leaf.ocsp", ocsp_response(ocsp.OCSPCertStatus.REVOKED, algorithm=hashes.SHA256()))
    )
    assert got.state is RevocationState.REVOKED


def test_ocsp_for_another_certificate_says_nothing() -> None:
    got = status(("other.ocsp", ocsp_response(ocsp.OCSPCertStatus.REVOKED, cert=OTHER_LEAF)))
    assert got.state is RevocationState.UNKNOWN


def test_ocsp_signed_by_a_stranger_is_ignored() -> None:
    stranger_key = _key()
    stranger = _cert("test GPU ICA", stranger_key, None, stranger_key, ca=True)  # same name
    got = status(
        (
            "forged.ocsp",
            ocsp_response(ocsp.OCSPCertStatus.GOOD, signer=stranger, signer_key=stranger_key),
        )
    )
    assert got.state is RevocationState.UNKNOWN
    assert "forged.ocsp" in got.detail


def test_ocsp_naming_the_issuer_with_a_bad_signature_is_ignored() -> None:
    data = bytearray(ocsp_response(ocsp.OCSPCertStatus.GOOD))
    data[-1] ^= 1  # no certificates carried: the last byte is the signature's
    got = status(("forged.ocsp", bytes(data)))
    assert got.state is RevocationState.UNKNOWN
    assert "signature does not verify" in got.detail


def test_ocsp_for_the_same_serial_from_another_issuer_says_nothing() -> None:
    other_key = _key()
    other_ca = _cert("another ICA", other_key, None, other_key, ca=True)
    twin = (
        x509.CertificateBuilder()
        .subject_name(LEAF.subject)
        .issuer_name(other_ca.subject)
        .public_key(LEAF.public_key())
        .serial_number(LEAF.serial_number)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(other_key, hashes.SHA384())
    )
    # Signed by our CA, so only the CertID's issuer hashes tell it is not about LEAF.
    got = status(
        ("twin.ocsp", ocsp_response(ocsp.OCSPCertStatus.REVOKED, cert=twin, issuer=other_ca))
    )
    assert got.state is RevocationState.UNKNOWN


def test_ocsp_from_the_future_is_ignored() -> None:
    got = status(("future.ocsp", ocsp_response(ocsp.OCSPCertStatus.GOOD, this_update=NOW + DAY)))
    assert got.state is RevocationState.UNKNOWN
    assert "after now" in got.detail


def test_delegated_responder_with_ocsp_signing() -> None:
    key = _key()
    responder = _cert("OCSP responder", key, CA, CA_KEY, eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
    got = status(
        (
            "leaf.ocsp",
            ocsp_response(
                ocsp.OCSPCertStatus.REVOKED, signer=responder, signer_key=key, carry=[responder]
            ),
        )
    )
    assert got.state is RevocationState.REVOKED


def test_delegated_responder_without_ocsp_signing_is_ignored() -> None:
    key = _key()
    responder = _cert("OCSP responder", key, CA, CA_KEY, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    got = status(
        (
            "leaf.ocsp",
            ocsp_response(
                ocsp.OCSPCertStatus.GOOD, signer=responder, signer_key=key, carry=[responder]
            ),
        )
    )
    assert got.state is RevocationState.UNKNOWN
    assert "delegated" in got.detail


def test_delegated_responder_not_issued_by_the_issuer_is_ignored() -> None:
    other_key = _key()
    other_ca = _cert("test GPU ICA", other_key, None, other_key, ca=True)
    key = _key()
    responder = _cert(
        "OCSP responder", key, other_ca, other_key, eku=[ExtendedKeyUsageOID.OCSP_SIGNING]
    )
    got = status(
        (
            "leaf.ocsp",
            ocsp_response(
                ocsp.OCSPCertStatus.GOOD, signer=responder, signer_key=key, carry=[responder]
            ),
        )
    )
    assert got.state is RevocationState.UNKNOWN


def test_ocsp_age_and_staleness() -> None:
    got = status(
        (
            "leaf.ocsp",
            ocsp_response(
                ocsp.OCSPCertStatus.GOOD,
                this_update=NOW - 8 * DAY,
                next_update=NOW + DAY,
            ),
        )
    )
    assert (got.state, got.age, got.stale) == (RevocationState.GOOD, 8 * DAY, True)


def test_no_data_is_unknown() -> None:
    got = status()
    assert got.state is RevocationState.UNKNOWN
    assert got.detail == "no CRL or OCSP response from its issuer"


# --- loading ---------------------------------------------------------------------------------


def test_load_directory(tmp_path: Path) -> None:
    (tmp_path / "ica.crl").write_bytes(crl([LEAF.serial_number]))
    (tmp_path / "ica.pem").write_bytes(crl([], pem=True))
    (tmp_path / "leaf.ocsp").write_bytes(ocsp_response(ocsp.OCSPCertStatus.GOOD))
    (tmp_path / ".hidden").write_bytes(b"editor swap file")
    (tmp_path / "sub").mkdir()
    revocations = Revocations.load(tmp_path)
    assert len(revocations.sources) == 3
    assert revocations.status(LEAF, CA, NOW, MAX_AGE).state is RevocationState.REVOKED


def test_bad_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "good.crl").write_bytes(crl([]))
    (tmp_path / "notes.txt").write_bytes(b"fetched from nvidia on monday")
    with pytest.raises(ConfigError, match=r"notes\.txt.*CRL \(PEM or DER\) or an OCSP"):
        Revocations.load(tmp_path)


def test_the_verifier_leaves_a_bad_file_out_and_keeps_the_others(tmp_path: Path) -> None:
    """Not strict (the verifier, at start and on SIGHUP): a stray file must not keep a new
    CRL's revocations out (review M4: the whole directory refused on reload, the old data
    stayed in force and a newly revoked GPU passed)."""
    (tmp_path / "ica.crl").write_bytes(crl([LEAF.serial_number]))
    (tmp_path / "notes.txt").write_bytes(b"fetched from nvidia on monday")
    (tmp_path / "huge.crl").write_bytes(bytes(MAX_FILE_BYTES + 1))
    revocations = Revocations.load(tmp_path, strict=False)
    assert revocations.status(LEAF, CA, NOW, MAX_AGE).state is RevocationState.REVOKED
    assert len(revocations.problems) == 2
    assert "huge.crl" in revocations.problems[0]
    assert "notes.txt" in revocations.problems[1]


def test_crls_of_many_issuers_are_looked_up_by_issuer() -> None:
    """Fifty other issuers' CRLs (review M5: every CRL was compared with every
    certificate) and the issuer's own one among them still decides."""
    others = [
        crl([LEAF.serial_number], issuer=_name(f"another ICA {n}"), key=_key()) for n in range(50)
    ]
    revocations = Revocations.from_files(
        [*((f"other-{n}.crl", data) for n, data in enumerate(others)), ("ica.crl", crl([]))]
    )
    assert revocations.status(LEAF, CA, NOW, MAX_AGE).state is RevocationState.GOOD
    assert revocations.status(LEAF, CA, NOW, MAX_AGE).source == "ica.crl"


def test_bad_pem_is_named(tmp_path: Path) -> None:
    (tmp_path / "ica.pem").write_bytes(CA.public_bytes(Encoding.PEM))  # a certificate
    with pytest.raises(ConfigError, match=r"ica\.pem.*PEM CRL"):
        Revocations.load(tmp_path)


def test_unsuccessful_ocsp_response_is_named(tmp_path: Path) -> None:
    data = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.TRY_LATER
    ).public_bytes(Encoding.DER)
    (tmp_path / "leaf.ocsp").write_bytes(data)
    with pytest.raises(ConfigError, match=r"leaf\.ocsp.*TRY_LATER"):
        Revocations.load(tmp_path)


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gpu\.revocation: cannot read the directory"):
        Revocations.load(tmp_path / "absent")
