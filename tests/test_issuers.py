"""Issue 10, item 1: device certificates come from device issuing CAs of their own, and the
relying-party bundle holds only those, so that channel, operator and server certificates do
not verify against it with any tool (openssl, cryptography); device certificates follow the
SPIFFE X509-SVID profile; a rotated-in CA is published before it signs, and a retired one
stays in the bundle while certificates it signed live."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from devtrust.core.claims import DeviceClaims
from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.core.ids import DeviceId, Serial
from devtrust.core.tier import Tier
from devtrust.v1 import attestation_pb2
from devtrust.verifier import wire_attest
from devtrust.verifier.ca import (
    ALWAYS,
    CLOCK_SKEW,
    CertificateAuthority,
    DeviceIssuers,
    Issuer,
    new_device_ca,
    pem,
)
from devtrust.verifier.decision import Decision
from devtrust.verifier.device_pki import load_device_issuers, rotate_device_ca
from devtrust.verifier.pki import PkiFiles, init_pki, issue_operator, load_ca
from devtrust.verifier.records import CertificateRecord
from devtrust.verifier.trust import TrustResult

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)
LIFETIME = datetime.timedelta(minutes=15)
DEVICE = DeviceId("ab" * 32)
TD = "devtrust.local"
ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtrust.verifier.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def _lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    return [line for line in run.stderr.splitlines() if line.startswith("devtrust-verifier: ")]


def _fixed(now: datetime.datetime) -> Callable[[], datetime.datetime]:
    return lambda: now


def _issuers(files: PkiFiles, now: datetime.datetime) -> DeviceIssuers:
    verifier_ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    return load_device_issuers(
        files.directory, verifier_ca=verifier_ca, device_lifetime=LIFETIME, clock=_fixed(now)
    )


def _device(ca: CertificateAuthority, now: datetime.datetime, zone: str = "z") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return ca.issue_device(
        trust_domain=TD,
        device_id=DEVICE,
        public_key=key.public_key(),
        claims=DeviceClaims(Tier.AFFIRMING, zone),
        now=now,
        lifetime=LIFETIME,
    )


def _bundle_file(files: PkiFiles) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(files.device_bundle.read_bytes())


# --- every kind of certificate against the relying-party bundle ------------------------------


@pytest.fixture
def kinds(tmp_path: Path) -> tuple[PkiFiles, dict[str, Path]]:
    """A real PKI directory (init, at the real time: openssl reads the clock) and one
    certificate file of each kind the verifier issues."""
    now = datetime.datetime.now(datetime.UTC)
    files = init_pki(tmp_path / "pki", hostnames=["localhost"], now=now)
    ca = load_ca(files.ca_cert, files.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    channel = ca.issue_client(
        kind="agent",
        trust_domain=TD,
        name=DEVICE,
        public_key=key.public_key(),
        now=now,
        lifetime=datetime.timedelta(days=30),
    )
    operator, _ = issue_operator(ca, tmp_path / "ops", name="alice", trust_domain=TD, now=now)
    certs = {
        "device": _device(_issuers(files, now).current, now),
        "channel": channel,
        "operator": x509.load_pem_x509_certificate(operator.read_bytes()),
        "server": x509.load_pem_x509_certificate(files.server_cert.read_bytes()),
    }
    paths = {}
    for name, cert in certs.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(pem(cert))
    return files, paths


def _openssl_verify(ca_file: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", *extra, "-CAfile", str(ca_file), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_openssl_accepts_only_device_certificates_against_the_device_bundle(
    kinds: tuple[PkiFiles, dict[str, Path]],
) -> None:
    files, certs = kinds
    for purpose in ((), ("-purpose", "sslclient"), ("-purpose", "sslserver")):
        run = _openssl_verify(files.device_bundle, certs["device"], *purpose)
        assert run.returncode == 0, (purpose, run.stdout + run.stderr)
        assert run.stdout.strip().endswith(": OK")
    for name in ("channel", "operator", "server"):
        refused = _openssl_verify(files.device_bundle, certs[name])
        assert refused.returncode != 0, name
        assert "unable to get local issuer certificate" in refused.stdout + refused.stderr
        # ... for want of their issuer in the bundle: the verifier's CA accepts them.
        assert _openssl_verify(files.ca_cert, certs[name]).returncode == 0, name
    # The verifier's CA does not vouch for device certificates either.
    assert _openssl_verify(files.ca_cert, certs["device"]).returncode != 0


def test_cryptography_accepts_only_device_certificates_against_the_device_bundle(
    kinds: tuple[PkiFiles, dict[str, Path]],
) -> None:
    files, paths = kinds
    certs = {n: x509.load_pem_x509_certificate(p.read_bytes()) for n, p in paths.items()}
    bundle = Store(_bundle_file(files))
    verifier = PolicyBuilder().store(bundle).build_client_verifier()
    chain = verifier.verify(certs["device"], [])
    assert chain.chain[-1] == _bundle_file(files)[0]
    assert chain.subjects is not None
    assert x509.UniformResourceIdentifier(f"spiffe://{TD}/device/{DEVICE}") in chain.subjects
    for name in ("channel", "operator"):
        with pytest.raises(VerificationError, match="candidates exhausted"):
            verifier.verify(certs[name], [])
    server = PolicyBuilder().store(bundle).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(VerificationError, match="candidates exhausted"):
        server.verify(certs["server"], [])
    # The same certificates verify against the verifier's own CA: only the bundle refuses.
    own = Store([x509.load_pem_x509_certificate(files.ca_cert.read_bytes())])
    PolicyBuilder().store(own).build_client_verifier().verify(certs["channel"], [])
    PolicyBuilder().store(own).build_server_verifier(x509.DNSName("localhost")).verify(
        certs["server"], []
    )


def test_the_bundle_holds_no_verifier_ca(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    verifier_ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    issuers = _issuers(files, NOW)
    assert [c.public_key() for c in issuers.bundle()] == [
        c.public_key() for c in _bundle_file(files)
    ]
    assert verifier_ca.public_key() not in [c.public_key() for c in issuers.bundle()]


def test_a_device_ca_that_is_the_verifier_ca_is_refused_at_start(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    shutil.copyfile(files.ca_cert, files.device_ca_cert)
    shutil.copyfile(files.ca_key, files.device_ca_key)
    with pytest.raises(ConfigError, match="is the verifier's CA: relying parties trusting it"):
        _issuers(files, NOW)


# --- the X509-SVID profile ---------------------------------------------------------------------


def test_device_certificate_follows_the_x509_svid_profile(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    signer = _issuers(files, NOW).current
    key = ec.generate_private_key(ec.SECP256R1())
    cert = signer.issue_device(
        trust_domain=TD,
        device_id=DEVICE,
        public_key=key.public_key(),
        claims=DeviceClaims(Tier.WARNING, "production-inference"),
        now=NOW,
        lifetime=LIFETIME,
    )
    ext = cert.extensions
    # 2: exactly one URI SAN, the SPIFFE ID, with a non-root path.
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/device/{DEVICE}")]
    # 4.1: cA false, in a critical extension.
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    # 4.3: key usage critical, digitalSignature; never keyCertSign or cRLSign.
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    assert not ku.value.crl_sign
    assert not ku.value.content_commitment
    assert not ku.value.data_encipherment
    # 4.4: an EKU with both serverAuth and clientAuth.
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # The tier and zone travel in the certificate.
    assert DeviceClaims.from_certificate(cert) == DeviceClaims(Tier.WARNING, "production-inference")
    # Its issuer: a device issuing CA (3.2: cA true, keyCertSign), self-signed.
    issuer = signer.cert
    assert cert.issuer == issuer.subject
    assert issuer.issuer == issuer.subject
    ibc = issuer.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ibc.critical
    assert ibc.value.ca is True
    iku = issuer.extensions.get_extension_for_class(x509.KeyUsage)
    assert iku.critical
    assert iku.value.key_cert_sign
    assert not iku.value.digital_signature
    issuer_key = issuer.public_key()
    assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
    assert issuer_key.curve.name == "secp256r1"
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    # py-spiffe, which nobody here wrote, validates it as an X509-SVID (leaf and signer). In
    # a process of its own: its generated protos share names with the agent's Workload API.
    der = serialization.Encoding.DER
    chain = (cert.public_bytes(der) + issuer.public_bytes(der)).hex()
    key_der = key.private_bytes(
        der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).hex()
    check = (
        "import sys; from spiffe import X509Svid; "
        "svid = X509Svid.parse_raw(bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2])); "
        "print(svid.spiffe_id)"
    )
    run = subprocess.run(
        [sys.executable, "-c", check, chain, key_der],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"spiffe://{TD}/device/{DEVICE}"


# --- rotation ------------------------------------------------------------------------------


def test_a_rotated_ca_is_published_at_once_and_signs_only_from_its_time(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    first = _issuers(files, NOW).current.cert
    assert [c.subject for c in _bundle_file(files)] == [first.subject]

    rotation = rotate_device_ca(
        files.directory, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME
    )
    assert rotation is not None
    assert not rotation.promoted
    new = rotation.next.cert
    assert rotation.next.activate_after == NOW + LIFETIME
    assert json.loads(files.next_meta.read_text()) == {
        "activate_after": (NOW + LIFETIME).isoformat()
    }
    # Published at once, in the file and in what the verifier sends ...
    assert [c.subject for c in _bundle_file(files)] == [first.subject, new.subject]
    before = _issuers(files, NOW + LIFETIME - datetime.timedelta(seconds=1))
    assert [c.subject for c in before.bundle()] == [first.subject, new.subject]
    # ... but the old one signs until the activation time, the new one from then on.
    assert before.current.cert == first
    after = _issuers(files, NOW + LIFETIME)
    assert after.current.cert == new
    assert _device(after.current, NOW + LIFETIME).issuer == new.subject
    assert after.bundle()[0] == new  # the signing one first


def test_the_current_ca_follows_the_clock_without_a_restart(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    rotation = rotate_device_ca(
        files.directory, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME
    )
    assert rotation is not None
    clock = [NOW]
    verifier_ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    issuers = load_device_issuers(
        files.directory, verifier_ca=verifier_ca, device_lifetime=LIFETIME, clock=lambda: clock[0]
    )
    old = issuers.current.cert
    assert old != rotation.next.cert
    clock[0] = NOW + LIFETIME
    assert issuers.current.cert == rotation.next.cert


def test_a_retired_ca_stays_in_the_bundle_while_its_certificates_live(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    old = _issuers(files, NOW).current
    activation = NOW + LIFETIME
    rotation = rotate_device_ca(
        files.directory, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME
    )
    assert rotation is not None
    # The last certificate the old CA signed, just before the new one took over.
    last = _device(old, activation - datetime.timedelta(seconds=1))
    expiry = last.not_valid_after_utc
    for when in (activation, expiry - datetime.timedelta(seconds=1)):
        bundle = _issuers(files, when).bundle()
        assert old.cert in bundle, when
        store = Store(bundle)
        PolicyBuilder().store(store).time(when).build_client_verifier().verify(last, [])
    # Once every certificate it signed has expired (with the skew margin), it is left out.
    gone = activation + LIFETIME + CLOCK_SKEW
    assert old.cert not in _issuers(files, gone).bundle()
    assert rotation.next.cert in _issuers(files, gone).bundle()

    # A rotation after the activation promotes the published CA and records the old one,
    # without its key, for as long as it is needed.
    later = activation + datetime.timedelta(minutes=1)
    second = rotate_device_ca(
        files.directory, now=later, activate_after=LIFETIME, device_lifetime=LIFETIME
    )
    assert second is not None
    assert second.promoted
    assert x509.load_pem_x509_certificate(files.device_ca_cert.read_bytes()) == rotation.next.cert
    record = json.loads(files.retired.read_text())["retired"]
    assert [r["signed_until"] for r in record] == [activation.isoformat()]
    assert "PRIVATE KEY" not in files.retired.read_text()
    assert [c.subject for c in _bundle_file(files)] == [
        rotation.next.cert.subject,
        second.next.cert.subject,
        old.cert.subject,
    ]
    # The replaced files are kept, as init --force keeps them.
    assert len(list(files.directory.glob("device-ca.key.*.bak"))) == 1
    # A rotation after the retention drops the retired CA from the record and the bundle.
    third = rotate_device_ca(
        files.directory,
        now=second.next.activate_after,
        activate_after=LIFETIME,
        device_lifetime=LIFETIME,
    )
    assert third is not None
    assert third.promoted
    assert json.loads(files.retired.read_text())["retired"][0]["signed_until"] == (
        second.next.activate_after.isoformat()
    )
    assert old.cert.subject not in [c.subject for c in _bundle_file(files)]
    assert len(json.loads(files.retired.read_text())["retired"]) == 1


def test_a_second_rotation_before_the_first_signs_is_refused(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    rotate_device_ca(files.directory, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME)
    published = files.next_cert.read_bytes()
    with pytest.raises(DevtrustError, match="a next device CA is already published"):
        rotate_device_ca(
            files.directory,
            now=NOW + datetime.timedelta(minutes=1),
            activate_after=LIFETIME,
            device_lifetime=LIFETIME,
        )
    assert files.next_cert.read_bytes() == published


def test_device_issuers_pick_the_newest_active_signer() -> None:
    old, mid, new = (new_device_ca(NOW) for _ in range(3))
    retired = Issuer(cert=old.cert, key=None, activate_after=ALWAYS, signed_until=NOW)
    issuers = DeviceIssuers(
        [
            Issuer(cert=new.cert, key=new.key, activate_after=NOW + LIFETIME),
            retired,
            Issuer(cert=mid.cert, key=mid.key, activate_after=NOW),
        ],
        device_lifetime=LIFETIME,
        clock=_fixed(NOW),
    )
    assert issuers.current.cert == mid.cert
    assert issuers.bundle() == [mid.cert, new.cert, old.cert]
    assert issuers.signer_at(NOW + LIFETIME).cert == new.cert
    assert old.cert not in issuers.bundle_at(NOW + LIFETIME + CLOCK_SKEW)
    with pytest.raises(ValueError, match="signs nothing"):
        _ = retired.ca
    with pytest.raises(ValueError, match="no device issuing CA with its key"):
        DeviceIssuers([retired], device_lifetime=LIFETIME, clock=_fixed(NOW))


def test_the_crl_is_signed_by_the_current_ca_with_growing_numbers(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    issuers = _issuers(files, NOW)
    device = _device(issuers.current, NOW)
    numbers = []
    for _ in range(3):
        crl = issuers.sign_crl(
            [(device.serial_number, NOW)], now=NOW, next_update=NOW + datetime.timedelta(hours=1)
        )
        assert crl.issuer == issuers.current.cert.subject
        assert crl.is_signature_valid(issuers.current.key.public_key())
        entry = crl.get_revoked_certificate_by_serial_number(device.serial_number)
        assert entry is not None
        assert entry.revocation_date_utc == NOW
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    assert numbers == sorted(set(numbers))
    # A verifier restarted later starts above: the number is at least the time in ms.
    again = _issuers(files, NOW).sign_crl(
        [], now=NOW + datetime.timedelta(seconds=1), next_update=NOW + datetime.timedelta(hours=1)
    )
    later = again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert later > numbers[-1]


def test_openssl_refuses_a_revoked_device_certificate_with_the_crl(
    kinds: tuple[PkiFiles, dict[str, Path]], tmp_path: Path
) -> None:
    files, certs = kinds
    now = datetime.datetime.now(datetime.UTC)
    device = x509.load_pem_x509_certificate(certs["device"].read_bytes())
    issuers = _issuers(files, now)
    for revoked, expected in (([], 0), ([(device.serial_number, now)], 2)):
        crl = issuers.sign_crl(revoked, now=now, next_update=now + datetime.timedelta(hours=1))
        crl_file = tmp_path / "crl.pem"
        crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        run = _openssl_verify(
            files.device_bundle, certs["device"], "-crl_check", "-CRLfile", str(crl_file)
        )
        assert run.returncode == expected, run.stdout + run.stderr
    assert "certificate revoked" in run.stdout + run.stderr


# --- init, the command, and the wire -------------------------------------------------------


def test_init_makes_a_device_ca_and_force_voids_a_rotation(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    for path in (files.device_ca_cert, files.device_ca_key, files.device_bundle):
        assert path.exists(), path
    assert files.device_ca_key.stat().st_mode & 0o777 == 0o600
    rotate_device_ca(files.directory, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME)
    old = files.device_ca_cert.read_bytes()
    with pytest.raises(DevtrustError, match="already holds a CA"):
        init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    forced = init_pki(tmp_path, hostnames=["localhost"], now=NOW, force=True)
    assert files.device_ca_cert.read_bytes() != old
    assert not files.next_cert.exists()
    assert not files.next_meta.exists()
    kept = {p.name.split(".", 2)[0] + "." + p.name.split(".")[1] for p in forced.backups}
    assert {"device-ca.pem", "device-ca-next.pem", "device-ca-next.json"} <= kept
    assert len(_bundle_file(files)) == 1


def test_init_refuses_a_directory_with_only_a_device_ca(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    for path in files.all():
        path.unlink()
    with pytest.raises(DevtrustError, match=r"already holds a CA \(device-ca.pem, device-ca.key"):
        init_pki(tmp_path, hostnames=["localhost"], now=NOW)


def test_a_directory_without_a_device_ca_is_one_line_and_rotate_makes_the_first(
    tmp_path: Path,
) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    for path in (files.device_ca_cert, files.device_ca_key, files.device_bundle):
        path.unlink()  # a directory init made before device CAs existed
    with pytest.raises(
        ConfigError,
        match=rf"device CA certificate {files.device_ca_cert} does not exist: run "
        rf"`devtrust-verifier ca rotate --dir {tmp_path}` to make one",
    ):
        _issuers(files, NOW)
    assert (
        rotate_device_ca(tmp_path, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME)
        is None
    )
    assert _issuers(files, NOW).current.cert == _bundle_file(files)[0]


def test_ca_rotate_command(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert _run("init", "--dir", str(directory), "--hostname", "h").returncode == 0
    first = _run("ca", "rotate", "--dir", str(directory))
    assert first.returncode == 0, first.stderr
    assert f"next device issuing CA {directory}/device-ca-next.pem: published now" in first.stdout
    assert f"relying-party bundle {directory}/device-bundle.pem" in first.stdout
    again = _run("ca", "rotate", "--dir", str(directory))
    assert again.returncode == 2
    [line] = _lines(again)
    assert line.startswith("devtrust-verifier: a next device CA is already published and signs")
    negative = _run("ca", "rotate", "--dir", str(directory), "--activate-after", "-1")
    assert negative.returncode == 2
    assert _lines(negative) == [
        "devtrust-verifier: --device-lifetime-s is at least 60 and --activate-after at least 0 "
        "(seconds)"
    ]


def test_the_result_carries_the_trust_bundle(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    rotate_device_ca(files.directory, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME)
    issuers = _issuers(files, NOW)
    cert = _device(issuers.current, NOW)
    record = CertificateRecord(
        serial=Serial("1"),
        device_id=DEVICE,
        kind="device",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        der=cert.public_bytes(serialization.Encoding.DER),
    )
    decision = Decision(
        device_id=DEVICE,
        zone="z",
        result=TrustResult(
            device_id=DEVICE, claims={}, findings=(), appraised_at=NOW, expires_at=NOW + LIFETIME
        ),
        previous_tier=None,
        certificate=record,
        withheld="",
        tpm=None,
        rebooted=False,
        trust_bundle=issuers.bundle_der_at(NOW),
    )
    result = wire_attest.decision_to_wire(decision, next_challenge_in=0.0)
    assert isinstance(result, attestation_pb2.Result)
    sent = [x509.load_der_x509_certificate(d) for d in result.certificate.trust_bundle_der]
    assert sent == issuers.bundle()
    assert len(sent) == 2
    verifier_ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    assert verifier_ca not in sent


def test_a_device_ca_file_that_is_no_ca_or_expired_is_refused_at_start(tmp_path: Path) -> None:
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    later = NOW + datetime.timedelta(days=3651)  # past the device CA's ten years
    with pytest.raises(ConfigError, match=r"expired on .*: run `devtrust-verifier ca rotate"):
        _issuers(files, later)
    shutil.copyfile(files.server_cert, files.device_ca_cert)
    shutil.copyfile(files.server_key, files.device_ca_key)
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        _issuers(files, NOW)


def test_rotated_keys_keep_the_access_of_the_key_there(tmp_path: Path) -> None:
    """README: the service user reads the device CA key through its group (0640); a rotation
    run with sudo must not leave it a key it cannot read."""
    files = init_pki(tmp_path, hostnames=["localhost"], now=NOW)
    files.device_ca_key.chmod(0o640)
    rotate_device_ca(tmp_path, now=NOW, activate_after=LIFETIME, device_lifetime=LIFETIME)
    assert files.next_key.stat().st_mode & 0o777 == 0o640
    assert files.next_key.stat().st_gid == files.device_ca_key.stat().st_gid
    files.device_ca_key.chmod(0o600)
    rotate_device_ca(
        tmp_path, now=NOW + LIFETIME, activate_after=LIFETIME, device_lifetime=LIFETIME
    )
    for key in (files.device_ca_key, files.next_key):  # the promoted one too
        assert key.stat().st_mode & 0o777 == 0o600
