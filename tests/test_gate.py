"""The gate's decision and `devtrust gate check` (issue 10, item 6): a relying party allows a
good device certificate and refuses, each with its own reason, a look-alike from another CA,
an expired or not-yet-valid certificate, a wrong tier, trust domain or zone, a revoked serial
(feed or CRL), an out-of-date or foreign CRL, and every certificate that is not a device
X.509-SVID (the verifier's channel, operator and server certificates among them). The
adapters (gRPC, grpc.aio, TLS) and the revocation follower: tests/test_gate_adapters.py.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtrust.core.claims import DEVICE_CLAIMS_OID, DeviceClaims
from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.gate import Bundle, GateDecision, Reason, RevocationList, decide
from devtrust.verifier.ca import CertificateAuthority, pem
from devtrust.verifier.cli import main as devtrust_main

NOW = datetime.datetime.now(datetime.UTC)
TD = "devtrust.local"
DEVICE = DeviceId("ab" * 32)
LIFETIME = datetime.timedelta(minutes=15)
DEVICE_CA_NAME = "devtrust device CA"


@dataclass(frozen=True)
class Pki:
    device_ca: CertificateAuthority  # what the relying party trusts
    other_ca: CertificateAuthority  # channel, operator and server certificates
    rogue_ca: CertificateAuthority  # same name as device_ca, another key

    @property
    def bundle(self) -> Bundle:
        return Bundle((self.device_ca.cert,))


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(
        device_ca=CertificateAuthority.create(common_name=DEVICE_CA_NAME, now=NOW),
        other_ca=CertificateAuthority.create(common_name="devtrust verifier CA", now=NOW),
        rogue_ca=CertificateAuthority.create(common_name=DEVICE_CA_NAME, now=NOW),
    )


def device_cert(
    ca: CertificateAuthority,
    *,
    tier: Tier = Tier.AFFIRMING,
    zone: str = "production-inference",
    now: datetime.datetime = NOW,
    device: DeviceId = DEVICE,
    trust_domain: str = TD,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    public = (key or ec.generate_private_key(ec.SECP256R1())).public_key()
    return ca.issue_device(
        trust_domain=trust_domain,
        device_id=device,
        public_key=public,
        claims=DeviceClaims(tier=tier, zone=zone),
        now=now,
        lifetime=LIFETIME,
    )


CLAIMS = DeviceClaims(Tier.AFFIRMING, "z").to_extension()


def odd_leaf(
    ca: CertificateAuthority,
    *,
    uris: tuple[str, ...] = (f"spiffe://{TD}/device/{DEVICE}",),
    digital_signature: bool = True,
    crl_sign: bool = False,
    cert_sign: bool = False,
    claims: x509.ExtensionType | None = CLAIMS,
) -> x509.Certificate:
    """A leaf of ``ca`` shaped as a device certificate but for what the arguments change."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not digital_signature,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=1))
        .not_valid_after(NOW + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    if claims is not None:
        builder = builder.add_extension(claims, critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def crl_of(
    ca: CertificateAuthority,
    serials: list[int],
    *,
    next_update: datetime.datetime | None = None,
) -> x509.CertificateRevocationList:
    next_update = next_update or NOW + datetime.timedelta(minutes=10)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(min(NOW, next_update) - datetime.timedelta(hours=1))
        .next_update(next_update)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def gate(
    pki: Pki,
    chain: list[x509.Certificate],
    *,
    now: datetime.datetime = NOW,
    min_tier: Tier = Tier.WARNING,
    zones: frozenset[str] | None = frozenset({"production-inference"}),
    revoked: RevocationList | None = None,
    trust_domain: str | None = TD,
) -> GateDecision:
    return decide(
        chain,
        bundle=pki.bundle,
        now=now,
        min_tier=min_tier,
        zones=zones,
        revoked=revoked,
        trust_domain=trust_domain,
    )


# --- the decision -------------------------------------------------------------------------


def test_a_good_device_certificate_is_allowed(pki: Pki) -> None:
    cert = device_cert(pki.device_ca)
    decision = gate(pki, [cert])
    assert decision.allow, decision
    assert decision.reason is Reason.ALLOWED
    assert (decision.device_id, decision.tier, decision.zone) == (
        DEVICE,
        Tier.AFFIRMING,
        "production-inference",
    )
    assert decision.serial == f"{cert.serial_number:x}"
    assert DEVICE in decision.message
    assert "affirming" in decision.message
    # Any zone when none is required; a warning device where warning is the minimum.
    assert gate(pki, [device_cert(pki.device_ca, zone="lab")], zones=None).allow
    assert gate(pki, [device_cert(pki.device_ca, tier=Tier.WARNING)]).allow


def test_a_look_alike_from_another_ca_is_untrusted(pki: Pki) -> None:
    """Same CA name, same SPIFFE ID and claims; another key."""
    look_alike = device_cert(pki.rogue_ca)
    assert look_alike.issuer == pki.device_ca.cert.subject
    decision = gate(pki, [look_alike])
    assert (decision.allow, decision.reason) == (False, Reason.UNTRUSTED)
    assert (decision.device_id, decision.tier) == ("", None)  # nothing read from it
    # With the rogue CA sent along as an intermediate it still does not chain to the bundle.
    assert gate(pki, [look_alike, pki.rogue_ca.cert]).reason is Reason.UNTRUSTED


def test_an_expired_or_not_yet_valid_certificate_is_refused(pki: Pki) -> None:
    cert = device_cert(pki.device_ca)
    later = cert.not_valid_after_utc + datetime.timedelta(seconds=1)
    decision = gate(pki, [cert], now=later)
    assert (decision.allow, decision.reason) == (False, Reason.EXPIRED)
    assert cert.not_valid_after_utc.isoformat() in decision.message
    assert gate(pki, [cert], now=cert.not_valid_after_utc).allow  # the last valid instant
    earlier = cert.not_valid_before_utc - datetime.timedelta(seconds=1)
    assert gate(pki, [cert], now=earlier).reason is Reason.NOT_YET_VALID
    # A stranger's expired certificate is untrusted, never "ours, expired".
    assert gate(pki, [device_cert(pki.rogue_ca)], now=later).reason is Reason.UNTRUSTED


@pytest.mark.parametrize(
    ("tier", "minimum", "allowed"),
    [
        (Tier.AFFIRMING, Tier.AFFIRMING, True),
        (Tier.WARNING, Tier.AFFIRMING, False),
        (Tier.CONTRAINDICATED, Tier.WARNING, False),
        (Tier.NONE, Tier.CONTRAINDICATED, False),  # unappraised meets nothing
    ],
    ids=["affirming-at-affirming", "warning-below", "contraindicated-below", "none"],
)
def test_the_tier_must_meet_the_minimum(pki: Pki, tier: Tier, minimum: Tier, allowed: bool) -> None:
    decision = gate(pki, [device_cert(pki.device_ca, tier=tier)], min_tier=minimum)
    assert decision.allow is allowed, decision
    if not allowed:
        assert decision.reason is Reason.TIER
        assert f"tier {tier.label} does not meet the minimum {minimum.label}" in decision.message
        assert (decision.device_id, decision.zone) == (DEVICE, "production-inference")


def test_the_zone_must_be_allowed(pki: Pki) -> None:
    cert = device_cert(pki.device_ca, zone="model-development")
    decision = gate(pki, [cert], zones=frozenset({"production-inference", "staging"}))
    assert (decision.allow, decision.reason) == (False, Reason.ZONE)
    assert "zone 'model-development' is not allowed" in decision.message
    assert "'production-inference', 'staging'" in decision.message
    assert gate(pki, [cert], zones=frozenset()).reason is Reason.ZONE


def test_a_revoked_serial_is_refused_from_the_feed_and_from_the_crl(pki: Pki) -> None:
    cert, other = device_cert(pki.device_ca), device_cert(pki.device_ca)
    feed = RevocationList(serials=frozenset({cert.serial_number}))
    decision = gate(pki, [cert], revoked=feed)
    assert (decision.allow, decision.reason) == (False, Reason.REVOKED)
    assert f"serial {cert.serial_number:x} is revoked (revocation feed)" in decision.message
    assert gate(pki, [other], revoked=feed).allow

    crl = RevocationList(crl=crl_of(pki.device_ca, [cert.serial_number]))
    decision = gate(pki, [cert], revoked=crl)
    assert (decision.reason, decision.message.endswith("(CRL)")) == (Reason.REVOKED, True)
    assert gate(pki, [other], revoked=crl).allow


def test_an_out_of_date_or_foreign_crl_denies_with_its_own_reason(pki: Pki) -> None:
    cert = device_cert(pki.device_ca)
    stale = RevocationList(crl=crl_of(pki.device_ca, [], next_update=NOW - datetime.timedelta(1)))
    decision = gate(pki, [cert], revoked=stale)
    assert (decision.allow, decision.reason) == (False, Reason.CRL_STALE)
    assert "next update due" in decision.message
    # Signed by the look-alike CA (same issuer name): not a CRL of the bundle.
    foreign = RevocationList(crl=crl_of(pki.rogue_ca, []))
    assert gate(pki, [cert], revoked=foreign).reason is Reason.CRL_UNTRUSTED
    # What one bundle made of a CRL is not taken for another's.
    theirs = RevocationList(crl=crl_of(pki.device_ca, []))
    assert gate(pki, [cert], revoked=theirs).allow
    other = Bundle((pki.rogue_ca.cert,))
    decision = decide(
        [device_cert(pki.rogue_ca)],
        bundle=other,
        now=NOW,
        min_tier=Tier.WARNING,
        zones=None,
        revoked=theirs,
    )
    assert decision.reason is Reason.CRL_UNTRUSTED
    # A feed that cannot be relied on denies too.
    behind = RevocationList(feed_problem="disconnected since then")
    decision = gate(pki, [cert], revoked=behind)
    assert (decision.reason, "disconnected since then" in decision.message) == (
        Reason.FEED_STALE,
        True,
    )


def test_a_rotated_bundle_trusts_both_issuers_and_the_new_one_revokes(pki: Pki) -> None:
    """During a CA rotation the bundle holds the old and the new device CA; the CRL comes
    from the one that signs now and covers certificates of the other."""
    new = CertificateAuthority.create(common_name="devtrust device CA 2", now=NOW)
    old_cert, new_cert = device_cert(pki.device_ca), device_cert(new)
    both = Bundle((new.cert, pki.device_ca.cert))
    crl = RevocationList(crl=crl_of(new, [old_cert.serial_number]))

    def check(cert: x509.Certificate, revoked: RevocationList | None) -> Reason:
        return decide(
            [cert], bundle=both, now=NOW, min_tier=Tier.WARNING, zones=None, revoked=revoked
        ).reason

    assert check(old_cert, None) is check(new_cert, crl) is Reason.ALLOWED
    assert check(old_cert, crl) is Reason.REVOKED


def test_the_verifiers_other_certificates_are_not_device_certificates(pki: Pki) -> None:
    """Even when the bundle holds the CA that signs them (one CA for everything, as before
    issue 10), channel, operator and server certificates do not get in."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    same_ca = pki.other_ca
    bundle_of_all = Pki(device_ca=same_ca, other_ca=same_ca, rogue_ca=pki.rogue_ca)
    for kind in ("agent", "operator"):
        cert = same_ca.issue_client(
            trust_domain=TD, kind=kind, name=DEVICE, public_key=key, now=NOW, lifetime=LIFETIME
        )
        decision = gate(bundle_of_all, [cert], zones=None)
        assert (decision.allow, decision.reason) == (False, Reason.NOT_DEVICE), kind
        assert f"spiffe://{TD}/{kind}/" in decision.message
    server = same_ca.issue_server(
        hostnames=["verifier.example"], public_key=key, now=NOW, lifetime=LIFETIME
    )
    assert not gate(bundle_of_all, [server], zones=None).allow
    # And against the device bundle, none of them verifies at all.
    channel = same_ca.issue_client(
        trust_domain=TD, kind="agent", name=DEVICE, public_key=key, now=NOW, lifetime=LIFETIME
    )
    assert gate(pki, [channel]).reason is Reason.UNTRUSTED
    assert gate(pki, [pki.device_ca.cert]).reason is Reason.UNTRUSTED  # the CA itself


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ({"uris": ()}, Reason.NOT_DEVICE),
        ({"uris": (f"spiffe://{TD}/device/{DEVICE}", "https://example.com/")}, Reason.NOT_DEVICE),
        ({"uris": (f"spiffe://{TD}/device/{DEVICE}/extra",)}, Reason.NOT_DEVICE),
        ({"uris": (f"spiffe://{TD}/device/not-a-device-id",)}, Reason.NOT_DEVICE),
        ({"uris": (f"https://{TD}/device/{DEVICE}",)}, Reason.NOT_DEVICE),
        ({"uris": (f"spiffe://elsewhere.example/device/{DEVICE}",)}, Reason.TRUST_DOMAIN),
        ({"digital_signature": False}, Reason.NOT_DEVICE),
        ({"crl_sign": True}, Reason.NOT_DEVICE),
        # Refused by cryptography's web PKI profile already (EE keyUsage).
        ({"cert_sign": True}, Reason.UNTRUSTED),
        ({"claims": None}, Reason.NO_CLAIMS),
        (
            {"claims": x509.UnrecognizedExtension(DEVICE_CLAIMS_OID, b"\x0c\x02{}")},
            Reason.MALFORMED,
        ),
        (
            {"claims": x509.UnrecognizedExtension(DEVICE_CLAIMS_OID, b'\x0c\x0e{"tier":"gold"}')},
            Reason.MALFORMED,
        ),
    ],
    ids=[
        "no-uri",
        "two-uris",
        "deeper-path",
        "name-not-a-device-id",
        "not-spiffe",
        "other-trust-domain",
        "no-digital-signature",
        "crl-signer",
        "certificate-signer",
        "no-claims",
        "claims-without-tier",
        "unknown-tier",
    ],
)
def test_only_a_device_svid_with_readable_claims_gets_in(
    pki: Pki, shape: dict[str, object], reason: Reason
) -> None:
    leaf = odd_leaf(pki.device_ca, **shape)  # type: ignore[arg-type]
    decision = gate(pki, [leaf], zones=None)
    assert (decision.allow, decision.reason) == (False, reason), decision
    assert gate(pki, [odd_leaf(pki.device_ca)], zones=None).allow  # the shape unchanged


def test_any_trust_domain_when_none_is_required(pki: Pki) -> None:
    cert = device_cert(pki.device_ca, trust_domain="elsewhere.example")
    assert gate(pki, [cert], trust_domain=None).allow
    assert gate(pki, [cert]).reason is Reason.TRUST_DOMAIN


def test_no_certificate_and_a_naive_time(pki: Pki) -> None:
    assert gate(pki, []).reason is Reason.NO_CERTIFICATE
    with pytest.raises(ValueError, match="timezone-aware"):
        gate(pki, [device_cert(pki.device_ca)], now=NOW.replace(tzinfo=None))


def test_a_bundle_holds_only_ca_certificates(pki: Pki) -> None:
    with pytest.raises(ValueError, match="not a CA certificate"):
        Bundle((device_cert(pki.device_ca),))
    with pytest.raises(ValueError, match="no certificate"):
        Bundle(())
    assert Bundle.from_pem(pem(pki.device_ca.cert) + pem(pki.other_ca.cert)).certificates == (
        pki.device_ca.cert,
        pki.other_ca.cert,
    )


# --- devtrust gate check ------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    bundle: Path
    good: Path
    wrong_zone: Path
    crl: Path  # revokes `revoked`
    revoked: Path


@pytest.fixture
def files(pki: Pki, tmp_path: Path) -> Files:
    revoked = device_cert(pki.device_ca)
    crl = crl_of(pki.device_ca, [revoked.serial_number])
    out = Files(*(tmp_path / n for n in ("b.pem", "good.pem", "zone.pem", "r.crl", "r.pem")))
    out.bundle.write_bytes(pem(pki.device_ca.cert))
    out.good.write_bytes(pem(device_cert(pki.device_ca)))
    out.wrong_zone.write_bytes(pem(device_cert(pki.device_ca, zone="model-development")))
    out.crl.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    out.revoked.write_bytes(pem(revoked))
    return out


def run_check(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    try:
        status = devtrust_main(["gate", "check", *map(str, argv)])
    except SystemExit as exc:  # argparse's usage errors
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_gate_check_allows_and_denies_with_the_reason_first(
    files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_check(capsys, files.good, "--ca-bundle", files.bundle)
    assert (status, err) == (0, "")
    assert out.startswith(f"gate.allowed: device {DEVICE}, tier affirming")
    assert out.count("\n") == 1

    zone = ("--zone", "production-inference", "--zone", "staging")
    status, out, _ = run_check(capsys, files.wrong_zone, "--ca-bundle", files.bundle, *zone)
    assert status == 1
    assert out.startswith("gate.zone: ")
    assert out.count("\n") == 1

    status, out, _ = run_check(
        capsys, files.revoked, "--ca-bundle", files.bundle, "--crl", files.crl, "--json"
    )
    assert status == 1
    found = json.loads(out)
    assert (found["allow"], found["reason"], found["device_id"]) == (False, "gate.revoked", DEVICE)
    assert run_check(capsys, files.good, "--ca-bundle", files.bundle, "--crl", files.crl)[0] == 0

    status, out, _ = run_check(
        capsys, files.good, "--ca-bundle", files.bundle, "--min-tier", "warning", "--json"
    )
    assert (status, json.loads(out)["tier"]) == (0, "affirming")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (lambda f: [f.good], "the following arguments are required: --ca-bundle"),
        (lambda f: [f.good, "--ca-bundle", f.bundle, "--min-tier", "gold"], "unknown tier"),
        (lambda f: [f.bundle.parent / "none.pem", "--ca-bundle", f.bundle], "cannot read"),
        (lambda f: [f.crl, "--ca-bundle", f.bundle], "not a PEM or DER certificate"),
        (lambda f: [f.good, "--ca-bundle", f.good], "not a CA certificate"),
        (lambda f: [f.good, "--ca-bundle", f.bundle, "--crl", f.good], "not a PEM or DER CRL"),
    ],
    ids=["no-bundle", "bad-tier", "missing-file", "not-a-certificate", "leaf-as-bundle", "bad-crl"],
)
def test_gate_check_usage_errors_exit_2_in_one_line(
    files: Files, capsys: pytest.CaptureFixture[str], argv: object, says: str
) -> None:
    status, out, err = run_check(capsys, *argv(files))  # type: ignore[operator]
    assert status == 2
    assert says in err
    assert "Traceback" not in err
    assert out == ""


def test_the_gate_loads_no_tpm_gpu_or_verifier_code() -> None:
    """What a relying party installs: importing the gate (and its follower) loads neither a
    TPM or GPU library nor the agent, the verifier or swtpm (tests/test_layers.py checks the
    source; this, what really loads)."""
    banned = ("tpm2_pytss", "pynvml", "devtrust.agent", "devtrust.verifier", "devtrust.swtpm")
    code = (
        "import sys, devtrust.gate, devtrust.gate.follower, devtrust.gate.command\n"
        f"print(' '.join(m for m in sys.modules if m.split('.')[0] in {banned!r} "
        f"or any(m == b or m.startswith(b + '.') for b in {banned!r})))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == []
