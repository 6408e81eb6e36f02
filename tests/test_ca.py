"""Certificates the verifier's CA issues."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from devtrust.core.claims import DEVICE_CLAIMS_OID, DeviceClaims
from devtrust.core.ids import DeviceId, device_id_of, parse_device_id, serial_of
from devtrust.core.spiffe import (
    AGENT,
    DEVICE,
    OPERATOR,
    certificate_name,
    spiffe_id,
    spiffe_ids,
    spiffe_name,
)
from devtrust.core.tier import Tier
from devtrust.verifier.ca import CLOCK_SKEW, CertificateAuthority

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


def test_device_certificate_carries_identity_tier_and_zone() -> None:
    ca = CertificateAuthority.create(common_name="test CA", now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_device(
        trust_domain="fleet.example",
        device_id=DeviceId("ab" * 32),
        public_key=key.public_key(),
        claims=DeviceClaims(Tier.WARNING, "production-inference"),
        now=NOW,
        lifetime=datetime.timedelta(minutes=15),
    )
    assert spiffe_ids(cert) == [f"spiffe://fleet.example/device/{'ab' * 32}"]
    assert DeviceClaims.from_certificate(cert) == DeviceClaims(Tier.WARNING, "production-inference")
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(minutes=15)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # X509-SVID 4.4: an SVID's EKU names both (tests/test_issuers.py checks the profile).
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.cert)


def test_long_claims_round_trip() -> None:
    claims = DeviceClaims(Tier.AFFIRMING, "z" * 300)  # DER long-form length
    ca = CertificateAuthority.create(common_name="test CA", now=NOW)
    cert = ca.issue_device(
        trust_domain="t",
        device_id=DeviceId("d"),
        public_key=ca.key.public_key(),
        claims=claims,
        now=NOW,
        lifetime=datetime.timedelta(minutes=1),
    )
    assert DeviceClaims.from_certificate(cert) == claims


def _with_claims_json(ca: CertificateAuthority, text: bytes) -> x509.Certificate:
    """A certificate whose claims extension holds ``text`` (a DER UTF8String of it)."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "d")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(minutes=1))
        .add_extension(
            x509.UnrecognizedExtension(DEVICE_CLAIMS_OID, b"\x0c" + bytes([len(text)]) + text),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def test_claims_carry_the_tier_label_and_refuse_an_unknown_one() -> None:
    ca = CertificateAuthority.create(common_name="test CA", now=NOW)
    # Relying parties read the label, not the enum's number.
    ext = DeviceClaims(Tier.CONTRAINDICATED, "z").to_extension()
    body = b'{"tier":"contraindicated","zone":"z"}'
    assert ext.value == b"\x0c" + bytes([len(body)]) + body
    for tier in Tier:
        cert = _with_claims_json(ca, b'{"tier":"%s","zone":"z"}' % tier.label.encode())
        assert DeviceClaims.from_certificate(cert) == DeviceClaims(tier, "z")
    for bad in (b"platinum", b"Affirming", b" warning"):
        cert = _with_claims_json(ca, b'{"tier":"%s","zone":"z"}' % bad)
        with pytest.raises(ValueError, match=f"unknown tier '{bad.decode()}'"):
            DeviceClaims.from_certificate(cert)


def test_channel_certificate_has_no_device_claims() -> None:
    ca = CertificateAuthority.create(common_name="test CA", now=NOW)
    cert = ca.issue_client(
        kind="agent",
        trust_domain="t",
        name="d",
        public_key=ca.key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(days=1),
    )
    assert DeviceClaims.from_certificate(cert) is None
    assert spiffe_ids(cert) == ["spiffe://t/agent/d"]


def test_agent_enrolls_again_in_the_last_day_of_its_channel_certificate(tmp_path: object) -> None:
    import asyncio
    from pathlib import Path

    from devtrust.agent.state import AgentFiles, Enrollment, key_pem, new_key
    from devtrust.verifier.ca import pem

    ca = CertificateAuthority.create(common_name="test CA", now=NOW)
    key = new_key()
    cert = ca.issue_client(
        kind="agent",
        trust_domain="t",
        name="d",
        public_key=key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(days=30),
    )
    files = AgentFiles(Path(str(tmp_path)) / "state", Path(str(tmp_path)) / "run")
    asyncio.run(files.save_enrollment(Enrollment("d", key_pem(key), pem(cert), pem(ca.cert))))
    assert asyncio.run(files.load_enrollment(now=NOW + datetime.timedelta(days=28))) is not None
    late = NOW + datetime.timedelta(days=29, hours=1)
    assert asyncio.run(files.load_enrollment(now=late)) is None


def test_keys_to_certify_are_p256_p384_or_rsa2048_and_up() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from devtrust.verifier.errors import MalformedInput
    from devtrust.verifier.wire import load_public_key

    def spki(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    load_public_key(spki(ec.generate_private_key(ec.SECP384R1())), field="k")
    with pytest.raises(MalformedInput, match="P-256 or P-384 only"):
        load_public_key(spki(ec.generate_private_key(ec.SECP521R1())), field="k")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    with pytest.raises(MalformedInput, match="RSA key of 1024 bits"):
        load_public_key(spki(weak), field="k")
    with pytest.raises(MalformedInput, match="not a DER SubjectPublicKeyInfo"):
        load_public_key(b"\x30\x00", field="k")


def test_spiffe_names_are_one_segment_of_the_right_domain_and_kind() -> None:
    device = "ab" * 32
    uri = spiffe_id("fleet.example", DEVICE, device)
    assert uri == f"spiffe://fleet.example/device/{device}"
    assert spiffe_name(uri, trust_domain="fleet.example", kind=DEVICE) == device
    for other in (
        f"spiffe://other.example/device/{device}",  # another trust domain
        f"spiffe://fleet.example.evil/device/{device}",  # a domain that only starts alike
        f"spiffe://fleet.example/agent/{device}",  # another kind
        f"spiffe://fleet.example/device/{device}/extra",  # a deeper path
        "spiffe://fleet.example/device/",  # no name
    ):
        assert spiffe_name(other, trust_domain="fleet.example", kind=DEVICE) is None, other


def test_certificate_name_reads_the_kind_asked_for() -> None:
    ca = CertificateAuthority.create(common_name="test CA", now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_client(
        trust_domain="fleet.example",
        kind=OPERATOR,
        name="alice",
        public_key=key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(hours=1),
    )
    assert certificate_name(cert, trust_domain="fleet.example", kind=OPERATOR) == "alice"
    assert certificate_name(cert, trust_domain="fleet.example", kind=AGENT) is None
    assert certificate_name(cert, trust_domain="other.example", kind=OPERATOR) is None
    assert certificate_name(ca.cert, trust_domain="fleet.example", kind=OPERATOR) is None


def test_device_ids_are_the_sha256_of_the_ek_spki() -> None:
    spki = b"\x30\x59 not really DER"
    assert device_id_of(spki) == hashlib.sha256(spki).hexdigest()
    assert parse_device_id("ab" * 32) == "ab" * 32
    for bad in ("AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, "", "ab" * 32 + "\n"):
        with pytest.raises(ValueError, match="is not 64 lowercase hex digits"):
            parse_device_id(bad)
    assert serial_of(0xABC) == "abc"
