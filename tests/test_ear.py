"""Attestation results as EAR (draft-ietf-rats-ear; issue 14): the claims set of a
TrustResult (verifier/ear.py), its ES256 JWT and what a relying party checks of it, the EAR
signing key and certificate `devtrust-verifier init` writes (verifier/pki.py), the Query
API's GetEar over the real verifier with mTLS (role viewer; NOT_FOUND; FAILED_PRECONDITION
without a key), and `devtrust score DEVICE --ear [--signed]`.

Each check of ``verify_ear`` has a token made to pass every other check, so that the test
fails when that check is removed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID

from devtrust.core.errors import ConfigError, DevtrustError
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import query_pb2, query_pb2_grpc
from devtrust.verifier import ear
from devtrust.verifier.ca import CertificateAuthority, pem, private_key_pem
from devtrust.verifier.config import EarConfig
from devtrust.verifier.ear import (
    EAR_SIGNING_EKU,
    EarFormatError,
    EarSignatureError,
    EarSigner,
    VerifierId,
    ear_claims,
    sign_ear,
    verify_ear,
    verify_ear_certificate,
)
from devtrust.verifier.main import main as verifier_main
from devtrust.verifier.pki import (
    PkiFiles,
    ear_certificate,
    init_pki,
    issue_ear_signer,
    load_ear_signer,
)
from devtrust.verifier.trust import Claim, Finding, Severity, SubResult, TrustResult
from tests.db import decision, device
from tests.env import running, verifier_config
from tests.test_authz import credentials
from tests.test_ops_cli import devtrust, profile

NOW = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)
DEVICE = DeviceId("ab" * 32)
VID = VerifierId(developer="devtrust", build="devtrust-verifier test")
OPERATORS = {"vera": "viewer", "rita": "relying-party"}

HOST_FINDING = Finding(
    id="posture.secure_boot.disabled",
    severity=Severity.WARNING,
    claim=Claim.CONFIGURATION,
    message=f"device {DEVICE}: Secure Boot is off",
    expected="on",
    found="off",
)
GPU_FINDING = Finding(
    id="gpu.measurement.mismatch",
    severity=Severity.CONTRAINDICATED,
    claim=Claim.EXECUTABLES,
    message="GPU 1: measurement block 5 differs from the VBIOS RIM",
    expected="aa..",
    found="bb..",
    subject="gpu1:GPU-bbbb",
)


def result(
    *,
    at: datetime.datetime = NOW,
    device_id: DeviceId = DEVICE,
    staleness: datetime.timedelta = datetime.timedelta(hours=1),
) -> TrustResult:
    """A host whose own claims are warning, with an affirming GPU 0 and a contraindicated
    GPU 1 (a result as the brief allows: host claims and GPU claims given apart, so that
    the top-level status can be seen to come from the submods)."""
    return TrustResult(
        device_id=device_id,
        claims={Claim.INSTANCE_IDENTITY: 2, Claim.HARDWARE: 2, Claim.CONFIGURATION: 32},
        findings=(HOST_FINDING,),
        appraised_at=at,
        expires_at=at + staleness,
        evidence_digest="d1" * 32,
        policy_id="policy:sha256:0123",
        submods=(
            SubResult("gpu0:GPU-aaaa", {Claim.HARDWARE: 2, Claim.EXECUTABLES: 2}, ()),
            SubResult("gpu1:GPU-bbbb", {Claim.HARDWARE: 2, Claim.EXECUTABLES: 96}, (GPU_FINDING,)),
        ),
    )


def _ca(now: datetime.datetime = NOW) -> CertificateAuthority:
    return CertificateAuthority.create(common_name="devtrust verifier CA", now=now)


def _signer(ca: CertificateAuthority, now: datetime.datetime = NOW) -> EarSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    return EarSigner(key=key, cert=ear_certificate(ca, public_key=key.public_key(), now=now))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jws(header: bytes, payload: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    """A compact JWS of exactly these bytes, ES256-signed: tokens that only one check of
    verify_ear refuses."""
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _header(signer: EarSigner, **changes: Any) -> bytes:
    return json.dumps({"alg": "ES256", "typ": "JWT", "kid": signer.kid, **changes}).encode()


def _payload(**changes: Any) -> bytes:
    claims = ear_claims(result(), verifier_id=VID, now=NOW)
    return json.dumps({**claims, **changes}).encode()


# --- the claims set --------------------------------------------------------------------------


def test_claims_of_a_host_with_two_gpus() -> None:
    claims = ear_claims(result(), verifier_id=VID, now=NOW + datetime.timedelta(seconds=5))
    assert claims["eat_profile"] == "tag:ietf.org,2026:rats/ear#03"
    assert claims["iat"] == int(NOW.timestamp()) + 5
    assert claims["exp"] == int((NOW + datetime.timedelta(hours=1)).timestamp())
    assert claims["sub"] == DEVICE
    assert claims["ear_verifier_id"] == {"developer": "devtrust", "build": "devtrust-verifier test"}
    assert claims["devtrust.appraised-at"] == int(NOW.timestamp())
    assert claims["devtrust.evidence-digest"] == "d1" * 32
    submods = claims["submods"]
    assert list(submods) == ["host", "gpu-0", "gpu-1"]
    host = submods["host"]
    assert host["ear_status"] == "warning"
    assert host["ear_trustworthiness_vector"] == {
        "instance-identity": 2,
        "configuration": 32,
        "hardware": 2,
    }
    assert host["ear_appraisal_policy_ids"] == ["policy:sha256:0123"]
    assert host["devtrust.findings"] == [
        {
            "id": "posture.secure_boot.disabled",
            "severity": "warning",
            "claim": "configuration",
            "message": f"device {DEVICE}: Secure Boot is off",
            "expected": "on",
            "found": "off",
            "subject": "",
        }
    ]
    assert submods["gpu-0"]["ear_status"] == "affirming"
    assert submods["gpu-0"]["devtrust.name"] == "gpu0:GPU-aaaa"
    assert submods["gpu-0"]["devtrust.findings"] == []
    gpu1 = submods["gpu-1"]
    assert gpu1["ear_status"] == "contraindicated"
    assert gpu1["ear_trustworthiness_vector"] == {"executables": 96, "hardware": 2}
    assert [f["id"] for f in gpu1["devtrust.findings"]] == ["gpu.measurement.mismatch"]
    assert gpu1["devtrust.findings"][0]["subject"] == "gpu1:GPU-bbbb"
    # The top-level status is the least favourable of all submods: GPU 1's.
    assert claims["ear_status"] == "contraindicated"
    # The JSON is the claims set, nothing lost.
    assert json.loads(ear.ear_json(claims)) == claims


@pytest.mark.parametrize(
    ("host", "gpus", "top"),
    [
        pytest.param(2, (2, 2), "affirming", id="all affirming"),
        pytest.param(2, (2, 33), "warning", id="one gpu warning"),
        pytest.param(33, (2, 2), "warning", id="host warning"),
        pytest.param(2, (96, 33), "contraindicated", id="one gpu contraindicated"),
    ],
)
def test_status_is_the_least_favourable_submod(host: int, gpus: tuple[int, int], top: str) -> None:
    given = replace(
        result(),
        claims={Claim.HARDWARE: host},
        submods=tuple(
            SubResult(f"gpu{i}:GPU-{i}", {Claim.HARDWARE: v}, ()) for i, v in enumerate(gpus)
        ),
    )
    assert ear_claims(given, verifier_id=VID, now=NOW)["ear_status"] == top


def test_a_stale_result_asserts_nothing() -> None:
    later = NOW + datetime.timedelta(hours=2)
    claims = ear_claims(result().at(later), verifier_id=VID, now=later)
    assert claims["ear_status"] == "none"
    assert {k: s["ear_status"] for k, s in claims["submods"].items()} == {
        "host": "none",
        "gpu-0": "none",
        "gpu-1": "none",
    }
    assert claims["submods"]["host"]["ear_trustworthiness_vector"] == {}
    assert "freshness.stale" in [f["id"] for f in claims["submods"]["host"]["devtrust.findings"]]
    assert claims["exp"] < claims["iat"]


def test_a_device_never_appraised() -> None:
    claims = ear.unappraised_claims(DEVICE, verifier_id=VID, now=NOW)
    assert claims["ear_status"] == "none"
    assert claims["submods"] == {"host": {"ear_status": "none", "devtrust.findings": []}}
    assert "exp" not in claims


def test_two_submods_of_one_gpu_index_are_refused() -> None:
    twice = replace(
        result(),
        submods=(SubResult("gpu0:GPU-a", {}, ()), SubResult("gpu0:GPU-b", {}, ())),
    )
    with pytest.raises(ValueError, match="two submods named gpu-0"):
        ear_claims(twice, verifier_id=VID, now=NOW)


# --- the JWT ---------------------------------------------------------------------------------


def test_signed_ear_verifies_with_its_certificate_only() -> None:
    ca = _ca()
    signer, other = _signer(ca), _signer(ca)
    claims = ear_claims(result(), verifier_id=VID, now=NOW)
    token = sign_ear(claims, signer)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": ear.key_id(signer.cert)}
    assert verify_ear(token, signer.cert, now=NOW) == claims
    # Another key of the same CA: its kid differs, and so would the signature.
    with pytest.raises(EarSignatureError, match="signed by key"):
        verify_ear(token, other.cert)
    # A changed payload (contraindicated made affirming) no longer verifies.
    head, _, sig = token.split(".")
    forged = {**claims, "ear_status": "affirming"}
    with pytest.raises(EarSignatureError, match="does not verify with the key of certificate"):
        verify_ear(f"{head}.{_b64(ear.ear_json(forged).encode())}.{sig}", signer.cert)
    # One bit of the signature.
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[10] ^= 1
    with pytest.raises(EarSignatureError, match="does not verify"):
        verify_ear(f"{head}.{token.split('.')[1]}.{_b64(bytes(raw))}", signer.cert)


def test_a_token_without_kid_is_checked_by_its_signature() -> None:
    """The kid is a hint: without it, the signature alone decides."""
    ca = _ca()
    signer, other = _signer(ca), _signer(ca)
    header = json.dumps({"alg": "ES256", "typ": "JWT"}).encode()
    token = _jws(header, _payload(), signer.key)
    assert verify_ear(token, signer.cert)["sub"] == DEVICE
    with pytest.raises(EarSignatureError, match="does not verify"):
        verify_ear(token, other.cert)


@pytest.mark.parametrize(
    ("header", "payload", "error", "message"),
    [
        pytest.param(
            {"alg": "ES384"}, {}, EarSignatureError, "expected alg ES256, found 'ES384'",
            id="another alg, signed",
        ),
        pytest.param({"alg": "none"}, {}, EarSignatureError, "found 'none'", id="alg none"),
        pytest.param(
            {"crit": ["exp"]}, {}, EarFormatError, "unknown critical header", id="crit",
        ),
        pytest.param(
            {}, {"eat_profile": "tag:example.com,2024:other"}, EarFormatError,
            "expected eat_profile tag:ietf.org,2026:rats/ear#03", id="another profile",
        ),
    ],
)  # fmt: skip
def test_each_check_of_a_token(
    header: dict[str, Any], payload: dict[str, Any], error: type[Exception], message: str
) -> None:
    signer = _signer(_ca())
    token = _jws(_header(signer, **header), _payload(**payload), signer.key)
    with pytest.raises(error, match=message):
        verify_ear(token, signer.cert)


def test_expired_tokens_are_refused_when_a_time_is_given() -> None:
    signer = _signer(_ca())
    token = sign_ear(ear_claims(result(), verifier_id=VID, now=NOW), signer)
    assert verify_ear(token, signer.cert, now=NOW + datetime.timedelta(minutes=59))
    with pytest.raises(EarSignatureError, match="expired at 2026-11-01T13:00:00"):
        verify_ear(token, signer.cert, now=NOW + datetime.timedelta(hours=1))
    assert verify_ear(token, signer.cert)  # no time: the caller checks freshness itself


def test_a_claim_given_twice_is_refused() -> None:
    """Two values for ear_status: which one a reader takes is not defined (RFC 8259 4)."""
    signer = _signer(_ca())
    payload = _payload()[:-1] + b', "ear_status": "affirming"}'
    assert json.loads(payload)["ear_status"] == "affirming"  # a lenient reader's view
    with pytest.raises(EarFormatError, match=r"the claim 'ear_status' is given twice"):
        verify_ear(_jws(_header(signer), payload, signer.key), signer.cert)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        pytest.param("a.b", r"three parts\), found 2 parts", id="two parts"),
        pytest.param("a.b.c.d", "found 4 parts", id="four parts"),
        pytest.param("e30=.e30.AA", "header is not base64url without padding", id="padding"),
        pytest.param("e3+.e30.AA", "header is not base64url without padding", id="std alphabet"),
        pytest.param(f"{_b64(b'[1]')}.e30.AA", "header is not a JSON object", id="not object"),
        pytest.param(f"{_b64(b'{')}.e30.AA", "header is not JSON", id="not json"),
        pytest.param("x" * (ear.MAX_TOKEN + 1), "more than", id="too large"),
    ],
)
def test_malformed_tokens(token: str, message: str) -> None:
    signer = _signer(_ca())
    with pytest.raises(EarFormatError, match=message):
        verify_ear(token, signer.cert)


def test_a_short_signature_is_refused() -> None:
    signer = _signer(_ca())
    head, body, _ = sign_ear(ear_claims(result(), verifier_id=VID, now=NOW), signer).split(".")
    with pytest.raises(EarSignatureError, match="expected a 64-byte signature, found 32"):
        verify_ear(f"{head}.{body}.{_b64(bytes(32))}", signer.cert)


def test_a_signer_is_a_p256_key_and_its_certificate() -> None:
    ca = _ca()
    signer = _signer(ca)
    with pytest.raises(ValueError, match="not the key of its certificate"):
        EarSigner(key=ec.generate_private_key(ec.SECP256R1()), cert=signer.cert)
    with pytest.raises(TypeError, match="ECDSA P-256"):
        EarSigner(key=ec.generate_private_key(ec.SECP384R1()), cert=signer.cert)


# --- the signing certificate -----------------------------------------------------------------


def test_the_signing_certificate_profile() -> None:
    ca = _ca()
    cert = _signer(ca).cert
    cert.verify_directly_issued_by(ca.cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [EAR_SIGNING_EKU]
    assert ExtendedKeyUsageOID.SERVER_AUTH not in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH not in eku
    verify_ear_certificate(cert, roots=[ca.cert], at=NOW)


def test_only_an_ear_signer_of_the_ca_is_accepted() -> None:
    ca = _ca()
    key = ec.generate_private_key(ec.SECP256R1())
    # A certificate of the same CA without the EAR EKU: an operator's (clientAuth).
    operator = ca.issue_client(
        trust_domain="devtrust.local",
        kind="operator",
        name="mallory",
        public_key=key.public_key(),
        now=NOW,
        lifetime=datetime.timedelta(days=1),
    )
    with pytest.raises(EarSignatureError, match=r"no extended key usage 2\.25\."):
        verify_ear_certificate(operator, roots=[ca.cert], at=NOW)
    # An EAR signer of another CA.
    with pytest.raises(EarSignatureError, match="is not an EAR signer of the verifier's CA"):
        verify_ear_certificate(_signer(_ca()).cert, roots=[ca.cert], at=NOW)
    # Past its validity.
    with pytest.raises(EarSignatureError, match="is not an EAR signer"):
        verify_ear_certificate(
            _signer(ca).cert, roots=[ca.cert], at=NOW + datetime.timedelta(days=400)
        )


def test_init_writes_the_ear_key_and_certificate(tmp_path: Path) -> None:
    files = init_pki(tmp_path / "pki", hostnames=["localhost"], now=NOW)
    assert stat.S_IMODE(files.ear_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.ear_cert.stat().st_mode) == 0o644
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    signer = load_ear_signer(files.ear_key, files.ear_cert, ca=ca)
    verify_ear_certificate(signer.cert, roots=[ca], at=NOW)
    token = sign_ear(ear_claims(result(), verifier_id=VID, now=NOW), signer)
    assert verify_ear(token, signer.cert)["ear_status"] == "contraindicated"
    # A forced init makes a new key and keeps the old one beside it.
    again = init_pki(tmp_path / "pki", hostnames=["localhost"], now=NOW, force=True)
    assert any(p.name.startswith("ear.key.") for p in again.backups)
    assert files.ear_key.read_bytes() != private_key_pem(signer.key)


def test_loading_the_signer_names_the_file(tmp_path: Path) -> None:
    files = init_pki(tmp_path / "a", hostnames=["localhost"], now=NOW)
    other = init_pki(tmp_path / "b", hostnames=["localhost"], now=NOW)
    with pytest.raises(ConfigError, match=r"EAR signing key .*ear.key does not exist: run "):
        load_ear_signer(tmp_path / "ear.key", files.ear_cert)
    with pytest.raises(ConfigError, match="is not the key of certificate"):
        load_ear_signer(files.ear_key, other.ear_cert)
    foreign_ca = x509.load_pem_x509_certificate(other.ca_cert.read_bytes())
    with pytest.raises(ConfigError, match="is not issued by the verifier's CA"):
        load_ear_signer(files.ear_key, files.ear_cert, ca=foreign_ca)
    (tmp_path / "p384.key").write_bytes(private_key_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ConfigError, match="not an ECDSA P-256 key"):
        load_ear_signer(tmp_path / "p384.key", files.ear_cert)


# --- GetEar over the verifier ----------------------------------------------------------------


def _config(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA, keys: EarConfig) -> Any:
    return replace(verifier_config(workdir, pki, ek_ca), operators=OPERATORS, ear=keys)


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_get_ear_over_mtls(workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA) -> None:
    config = _config(
        workdir, pki, endorsement_ca, EarConfig(signing_key=pki.ear_key, signing_cert=pki.ear_cert)
    )
    now = datetime.datetime.now(datetime.UTC)
    appraised, fresh = device(1), device(2)

    async def scenario() -> dict[str, Any]:
        async with running(config) as verifier:
            for rec in (appraised, fresh):
                await verifier.repos.devices.save(rec, now=now, event="enrolled:enrolled")
            stored = replace(decision(1), result=result(at=now, device_id=appraised.device_id))
            await verifier.repos.trust.record(stored)
            address = f"127.0.0.1:{verifier.attestation_port}"
            seen: dict[str, Any] = {}
            async with grpc.aio.secure_channel(
                address, credentials(pki, "operator", "vera")
            ) as channel:
                q = query_pb2_grpc.QueryStub(channel)
                seen["plain"] = await q.GetEar(
                    query_pb2.GetEarRequest(device_id=appraised.device_id), timeout=10
                )
                seen["signed"] = await q.GetEar(
                    query_pb2.GetEarRequest(device_id=appraised.device_id, signed=True), timeout=10
                )
                seen["fresh"] = await q.GetEar(
                    query_pb2.GetEarRequest(device_id=fresh.device_id, signed=True), timeout=10
                )
                seen["unknown"] = await _status(
                    q.GetEar(query_pb2.GetEarRequest(device_id="cd" * 32), timeout=10)
                )
            async with grpc.aio.secure_channel(
                address, credentials(pki, "operator", "rita")
            ) as channel:
                q = query_pb2_grpc.QueryStub(channel)
                seen["relying party"] = await _status(
                    q.GetEar(query_pb2.GetEarRequest(device_id=appraised.device_id), timeout=10)
                )
            return seen

    seen = asyncio.run(scenario())
    plain = json.loads(seen["plain"].json)
    assert seen["plain"].jwt == ""
    assert plain["sub"] == appraised.device_id
    assert plain["ear_status"] == "contraindicated"
    assert list(plain["submods"]) == ["host", "gpu-0", "gpu-1"]
    assert plain["submods"]["gpu-1"]["ear_status"] == "contraindicated"
    assert plain["submods"]["host"]["ear_appraisal_policy_ids"] == ["policy:sha256:0123"]
    assert plain["ear_verifier_id"]["developer"] == "devtrust"
    # The signed one: a relying party checks ear.pem to ca.pem, then the JWT with it.
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.ear_cert.read_bytes())
    verify_ear_certificate(cert, roots=[ca], at=now)
    signed = seen["signed"]
    claims = verify_ear(signed.jwt, cert, now=now)
    assert claims == json.loads(signed.json)
    assert claims["submods"] == plain["submods"]
    with pytest.raises(EarSignatureError):
        verify_ear(signed.jwt, _signer(_ca()).cert)
    head, _, sig = signed.jwt.split(".")
    changed = _b64(json.dumps({**claims, "ear_status": "affirming"}).encode())
    with pytest.raises(EarSignatureError, match="does not verify"):
        verify_ear(f"{head}.{changed}.{sig}", cert)
    # Never appraised: status none, and signed all the same.
    assert verify_ear(seen["fresh"].jwt, cert)["ear_status"] == "none"
    code, details = seen["unknown"]
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert "cd" * 32 in details
    code, details = seen["relying party"]
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "/devtrust.v1.Query/GetEar needs role viewer or above" in details


def test_signed_without_a_key_is_a_failed_precondition(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    missing = EarConfig(signing_key=workdir / "no" / "ear.key", signing_cert=pki.ear_cert)
    config = _config(workdir, pki, endorsement_ca, missing)
    rec = device(3)

    async def scenario() -> tuple[tuple[grpc.StatusCode, str], str]:
        async with running(config) as verifier:
            await verifier.repos.devices.save(rec, now=NOW, event="enrolled:enrolled")
            address = f"127.0.0.1:{verifier.attestation_port}"
            async with grpc.aio.secure_channel(
                address, credentials(pki, "operator", "vera")
            ) as channel:
                q = query_pb2_grpc.QueryStub(channel)
                refused = await _status(
                    q.GetEar(query_pb2.GetEarRequest(device_id=rec.device_id, signed=True))
                )
                plain = await q.GetEar(query_pb2.GetEarRequest(device_id=rec.device_id))
                return refused, plain.json

    (code, details), plain = asyncio.run(scenario())
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"ear.signing_key ({workdir}/no/ear.key)" in details
    assert f"EAR signing key {workdir}/no/ear.key does not exist" in details
    assert f"run `devtrust-verifier ear-key --dir {workdir}/no`" in details
    assert "`devtrust-verifier init` makes them" in details
    assert json.loads(plain)["ear_status"] == "none"  # unsigned still served


def _write_signer(ca: CertificateAuthority, keys: EarConfig) -> EarSigner:
    signer = _signer(ca, datetime.datetime.now(datetime.UTC))
    keys.signing_key.write_bytes(private_key_pem(signer.key))
    keys.signing_cert.write_bytes(pem(signer.cert))
    return signer


def test_a_replaced_key_signs_the_next_ear(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """The key is read again when its files change, and a key gone stops signing at once
    (no copy of it kept)."""
    keys = EarConfig(signing_key=workdir / "ear.key", signing_cert=workdir / "ear.pem")
    ca = CertificateAuthority.load(pki.ca_cert, pki.ca_key)
    first = _write_signer(ca, keys)
    config = _config(workdir, pki, endorsement_ca, keys)
    rec = device(5)

    async def scenario() -> tuple[str, str, str, tuple[grpc.StatusCode, str]]:
        async with running(config) as verifier:
            await verifier.repos.devices.save(rec, now=NOW, event="enrolled:enrolled")
            address = f"127.0.0.1:{verifier.attestation_port}"
            async with grpc.aio.secure_channel(
                address, credentials(pki, "operator", "vera")
            ) as channel:
                q = query_pb2_grpc.QueryStub(channel)
                ask = query_pb2.GetEarRequest(device_id=rec.device_id, signed=True)
                before = (await q.GetEar(ask, timeout=10)).jwt
                again = (await q.GetEar(ask, timeout=10)).jwt
                second = _write_signer(ca, keys)
                after = (await q.GetEar(ask, timeout=10)).jwt
                keys.signing_key.unlink()
                gone = await _status(q.GetEar(ask, timeout=10))
                assert verify_ear(after, second.cert)
                return before, again, after, gone

    before, again, after, (code, details) = asyncio.run(scenario())
    assert verify_ear(before, first.cert)
    assert verify_ear(again, first.cert)
    with pytest.raises(EarSignatureError, match="signed by key"):
        verify_ear(after, first.cert)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"EAR signing key {keys.signing_key} does not exist" in details


# --- devtrust score --ear --------------------------------------------------------------------


def test_score_prints_the_ear_and_the_jwt(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = _config(
        workdir, pki, endorsement_ca, EarConfig(signing_key=pki.ear_key, signing_cert=pki.ear_cert)
    )
    now = datetime.datetime.now(datetime.UTC)
    rec = device(4)

    async def scenario() -> dict[str, Any]:
        async with running(config) as verifier:
            await verifier.repos.devices.save(rec, now=now, event="enrolled:enrolled")
            stored = replace(decision(4), result=result(at=now, device_id=rec.device_id))
            await verifier.repos.trust.record(stored)
            vera = str(profile(workdir, pki, verifier, "vera"))
            short = rec.device_id[:12]
            return {
                "ear": await devtrust("score", short, "--ear", "--profile", vera),
                "signed": await devtrust("score", short, "--ear", "--signed", "--profile", vera),
                "signed alone": await devtrust("score", short, "--signed", "--profile", vera),
            }

    runs = asyncio.run(scenario())
    printed = runs["ear"]
    assert printed.status == 0, printed.err
    assert printed.out.startswith("{\n  ")  # indented for people
    claims = printed.json()
    assert (claims["sub"], claims["ear_status"]) == (rec.device_id, "contraindicated")
    signed = runs["signed"]
    assert signed.status == 0, signed.err
    [token] = signed.out.splitlines()
    cert = x509.load_pem_x509_certificate(pki.ear_cert.read_bytes())
    assert verify_ear(token, cert)["submods"] == claims["submods"]
    alone = runs["signed alone"]
    assert alone.status == 2
    assert "--signed signs the EAR: give --ear --signed" in alone.err


def test_ear_key_issues_a_signer_for_a_directory_init_made(tmp_path: Path) -> None:
    """A verifier set up before EARs: `ear-key` adds the pair with the CA already there,
    refuses to replace one without --force, and keeps the replaced files."""
    directory = tmp_path / "pki"
    files = init_pki(directory, hostnames=["localhost"], now=NOW)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    files.ear_key.unlink()
    files.ear_cert.unlink()
    assert verifier_main(["ear-key", "--dir", str(directory)]) == 0
    made = load_ear_signer(files.ear_key, files.ear_cert, ca=ca)
    verify_ear_certificate(made.cert, roots=[ca], at=datetime.datetime.now(datetime.UTC))
    assert stat.S_IMODE(files.ear_key.stat().st_mode) == 0o600
    with pytest.raises(DevtrustError, match="already holds an EAR signing key"):
        issue_ear_signer(directory, now=NOW)
    again = issue_ear_signer(directory, now=NOW, force=True)
    assert {p.name.split(".")[0] + "." + p.name.split(".")[1] for p in again.backups} == {
        "ear.key",
        "ear.pem",
    }
    assert load_ear_signer(files.ear_key, files.ear_cert, ca=ca).kid != made.kid
    with pytest.raises(ConfigError, match=r"CA certificate .*ca.pem does not exist"):
        issue_ear_signer(tmp_path / "empty", now=NOW)
