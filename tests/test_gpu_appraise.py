"""The appraisal of GPUs' own attestation reports (verifier/gpu/appraise.py, issue 14): the
recorded 545.00 report, its chain and NVIDIA's two test RIMs verify end to end offline; broken
copies each give their one named finding; re-signed copies (a test attestation key under a
test root given as an anchor) reach the checks past the signature: RIM comparison, versions,
nonces per challenge and GPU index, duplicates, revocation."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from devtrust.core.binding import gpu_nonce
from devtrust.verifier.gpu import spdm
from devtrust.verifier.gpu.appraise import (
    ChainCache,
    GpuAnchors,
    GpuVerdict,
    HostGpu,
    appraise_gpus,
    appraise_report,
)
from devtrust.verifier.gpu.revocation import Revocations
from devtrust.verifier.gpu.rim import FileRims, load_rim
from devtrust.verifier.gpu.types import (
    ERROR,
    REPORT,
    UNSUPPORTED,
    GpuEvidence,
    ReferenceMeasurement,
    Rim,
    RimKind,
    RimSource,
)
from devtrust.verifier.trust import Claim, Finding, Severity
from tests.corpus import corpus_root

CORPUS = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
RIM_TIME = datetime(2024, 6, 1, tzinfo=UTC)  # the RIM signers expire in June 2025
NOW = datetime(2026, 12, 1, tzinfo=UTC)
DEVICE = "dev-3f2a"

REPORT_545 = bytes.fromhex((CORPUS / "attestationReport-545.00.txt").read_text().strip())
CHAIN_545 = tuple(
    c.public_bytes(Encoding.DER)
    for c in x509.load_pem_x509_certificates((CORPUS / "gpuAkCertChain-545.00.txt").read_bytes())
)
REPORT_HOPPER = bytes.fromhex((CORPUS / "hopperAttestationReport.txt").read_text().strip())
CHAIN_HOPPER = tuple(
    c.public_bytes(Encoding.DER)
    for c in x509.load_pem_x509_certificates((CORPUS / "hopperCertChain.txt").read_bytes())
)
DEVICE_ROOT = x509.load_pem_x509_certificate((CORPUS / "verifier_device_root.pem").read_bytes())
RIM_ROOT = x509.load_pem_x509_certificate((CORPUS / "verifier_RIM_root.pem").read_bytes())
NONCE_545 = spdm.parse_report(REPORT_545).request.nonce

DRIVER = "545.00"
VBIOS = "96.00.5E.00.01"


def _rim(name: str) -> Rim:
    return load_rim((CORPUS / name).read_bytes(), roots=[RIM_ROOT], at=RIM_TIME, source=name)


DRIVER_RIM = _rim("Driver_RIM_test_no_gpu.swidtag")
VBIOS_RIM = _rim("1010_0200_882_96005E0001_test_no_gpu.swidtag")
VBIOS_PROD_RIM = _rim("1010_0200_882_96005E0001_PROD.swidtag")
RIMS = FileRims([DRIVER_RIM, VBIOS_RIM])


# --- a test attestation key under a test root, standing in for a GPU's ----------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    ica: x509.Certificate
    ica_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey

    @property
    def chain(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(Encoding.DER) for c in (self.leaf, self.ica, self.root))


_NVIDIA_SAN = x509.ObjectIdentifier("1.3.6.1.4.1.412.274.1")


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    extra: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=365))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:  # like NVIDIA's attestation key certificate: no basicConstraints, a SAN
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.OtherName(_NVIDIA_SAN, b"\x0c\x0cdevtrust:sim")]),
            critical=False,
        )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    for extension in extra:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def make_pki(tag: str = "") -> Pki:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _cert(f"devtrust test GPU root{tag} NOT NVIDIA", root_key, None, root_key, ca=True)
    ica_key = ec.generate_private_key(ec.SECP384R1())
    ica = _cert(f"devtrust test GPU ICA{tag}", ica_key, root, root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = _cert(f"devtrust test GPU attestation key{tag}", leaf_key, ica, ica_key, ca=False)
    return Pki(root, root_key, ica, ica_key, leaf, leaf_key)


PKI = make_pki()


def block_offsets(report: bytes) -> dict[int, int]:
    """SPDM block index -> offset of its measurement value in ``report``."""
    offsets: dict[int, int] = {}
    pos = 37 + 8  # request (11 e0 01 ff, nonce, slot), response header
    for block in spdm.parse_report(report).response.blocks:
        offsets[block.index] = pos + 7  # index, spec, size (2), type, value size (2)
        pos += 4 + 3 + len(block.value)
    return offsets


def edited(
    report: bytes = REPORT_545,
    *,
    nonce: bytes | None = None,
    blocks: dict[int, bytes] | None = None,
    sign: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """A copy of ``report`` with another request nonce and/or block values, re-signed with
    ``sign`` when given (else its recorded signature is kept: a broken copy)."""
    data = bytearray(report)
    if nonce is not None:
        data[4:36] = nonce
    offsets = block_offsets(report)
    for index, value in (blocks or {}).items():
        data[offsets[index] : offsets[index] + len(value)] = value
    if sign is not None:
        transcript = bytes(data[:-96])
        r, s = decode_dss_signature(sign.sign(transcript, ec.ECDSA(hashes.SHA384())))
        data[-96:] = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    out = bytes(data)
    spdm.parse_report(out)
    return out


def anchors(
    *roots: x509.Certificate,
    rims: RimSource = RIMS,
    revocation: Revocations | None = None,
    max_age: timedelta = timedelta(days=7),
) -> GpuAnchors:
    return GpuAnchors(
        device_roots=roots or (DEVICE_ROOT,),
        rims=rims,
        revocation=revocation,
        revocation_max_age=max_age,
    )


GPU0 = HostGpu(0, "gpu0:GPU-5e", VBIOS)


def check(
    report: bytes = REPORT_545,
    chain: tuple[bytes, ...] = CHAIN_545,
    *,
    gpu: HostGpu = GPU0,
    driver: str | None = DRIVER,
    nonce: bytes | None = NONCE_545,
    with_anchors: GpuAnchors | None = None,
    now: datetime = NOW,
) -> GpuVerdict:
    return appraise_report(
        GpuEvidence(gpu.index, REPORT, "", report, chain),
        gpu,
        driver_version=driver,
        expected_nonce=nonce,
        anchors=with_anchors or anchors(),
        now=now,
        device_id=DEVICE,
    )


def ids(verdict: GpuVerdict) -> list[str]:
    return [f.id for f in verdict.findings if f.severity > Severity.INFO]


def only(verdict: GpuVerdict, finding_id: str) -> str:
    """The one finding above INFO, which must be ``finding_id``; its message."""
    assert ids(verdict) == [finding_id], verdict.findings
    return next(f.message for f in verdict.findings if f.id == finding_id)


AFFIRMING = {Claim.HARDWARE: 2, Claim.EXECUTABLES: 2, Claim.CONFIGURATION: 2}


# --- the recorded report, end to end --------------------------------------------------------


def test_recorded_report_with_both_test_rims_is_affirming() -> None:
    verdict = check()
    assert verdict.claims == AFFIRMING
    assert ids(verdict) == []
    # Nothing is revoked-checked without data: said, as INFO.
    assert [f.id for f in verdict.findings] == ["gpu.revocation.unknown"]
    leaf = x509.load_der_x509_certificate(CHAIN_545[0])
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert verdict.identity == hashlib.sha256(spki).hexdigest()
    assert verdict.report is not None
    assert verdict.report.driver_version == DRIVER
    assert all(f.subject == GPU0.name for f in verdict.findings)


def test_corpus_rims_are_what_the_brief_says() -> None:
    # The comparison below is meaningful only if the RIMs cover what they claim.
    assert (DRIVER_RIM.kind, DRIVER_RIM.version, len(DRIVER_RIM.measurements)) == (
        RimKind.DRIVER,
        DRIVER,
        21,
    )
    assert (VBIOS_RIM.kind, VBIOS_RIM.version, len(VBIOS_RIM.measurements)) == (
        RimKind.VBIOS,
        VBIOS,
        12,
    )


def test_prod_vbios_rim_differs_at_four_indices() -> None:
    verdict = check(with_anchors=anchors(rims=FileRims([DRIVER_RIM, VBIOS_PROD_RIM])))
    mismatches = [f for f in verdict.findings if f.id == "gpu.measurement.mismatch"]
    assert len(mismatches) == 4
    assert verdict.claims[Claim.EXECUTABLES] == 96
    assert all("VBIOS RIM" in f.message and f.subject == GPU0.name for f in mismatches)


# --- broken copies ------------------------------------------------------------------------


def test_one_measurement_byte_breaks_the_signature() -> None:
    value = bytearray(spdm.parse_report(REPORT_545).response.blocks[7].value)
    value[0] ^= 1
    verdict = check(edited(blocks={8: bytes(value)}))
    message = only(verdict, "gpu.report.signature_invalid")
    assert "does not verify" in message
    assert verdict.claims == {Claim.HARDWARE: 99}  # nothing past a hard failure is asserted


def test_one_signature_byte() -> None:
    data = bytearray(REPORT_545)
    data[-1] ^= 0x80
    verdict = check(bytes(data))
    only(verdict, "gpu.report.signature_invalid")
    assert verdict.claims == {Claim.HARDWARE: 99}


def test_another_gpus_chain_is_signature_invalid() -> None:
    # The Hopper chain verifies to NVIDIA's root; its leaf did not sign the 545 report.
    verdict = check(chain=CHAIN_HOPPER)
    only(verdict, "gpu.report.signature_invalid")


def test_chain_from_another_root() -> None:
    # Signed by the test key, chained to the test root, which is not an anchor.
    verdict = check(edited(sign=PKI.leaf_key), PKI.chain)
    message = only(verdict, "gpu.certificate.chain_invalid")
    assert "NVIDIA Device Identity CA" in message
    assert verdict.claims == {Claim.HARDWARE: 97}
    # With the test root as an anchor the same report is good.
    good = check(edited(sign=PKI.leaf_key), PKI.chain, with_anchors=anchors(PKI.root))
    assert good.claims == AFFIRMING


def test_chain_with_undecodable_certificate() -> None:
    verdict = check(chain=(CHAIN_545[0][:-5], *CHAIN_545[1:]))
    assert "certificate 0" in only(verdict, "gpu.certificate.chain_invalid")


def test_no_device_root_is_chain_invalid() -> None:
    verdict = appraise_report(
        GpuEvidence(0, REPORT, "", REPORT_545, CHAIN_545),
        GPU0,
        driver_version=DRIVER,
        expected_nonce=None,
        anchors=GpuAnchors(device_roots=(), rims=RIMS),
        now=NOW,
        device_id=DEVICE,
    )
    assert "gpu.device_roots" in only(verdict, "gpu.certificate.chain_invalid")


def test_nonce_from_another_challenge() -> None:
    verdict = check(nonce=gpu_nonce(b"another challenge" * 2, 0))
    message = only(verdict, "gpu.report.nonce_mismatch")
    assert NONCE_545.hex() in message
    assert verdict.claims == {Claim.INSTANCE_IDENTITY: 99}


def test_no_expected_nonce_skips_the_nonce_check() -> None:
    # `devtrust gpu check` without --nonce.
    assert check(nonce=None).claims == AFFIRMING


def test_truncated_report_is_malformed() -> None:
    verdict = check(REPORT_545[:-10])
    message = only(verdict, "gpu.report.malformed")
    assert "Signature" in message
    assert "offset" in message
    assert verdict.claims == {Claim.HARDWARE: 99}
    assert verdict.report is None


def test_rim_for_another_vbios_and_driver() -> None:
    # The Hopper report (driver 550.90.07, VBIOS 96.00.9F.00.01) against the 545/5E RIMs.
    hopper_nonce = spdm.parse_report(REPORT_HOPPER).request.nonce
    verdict = check(
        REPORT_HOPPER,
        CHAIN_HOPPER,
        gpu=HostGpu(0, "gpu0:GPU-9f", "96.00.9F.00.01"),
        driver="550.90.07",
        nonce=hopper_nonce,
    )
    assert ids(verdict) == ["gpu.rim.version_mismatch", "gpu.rim.version_mismatch"]
    messages = [f.message for f in verdict.findings if f.id == "gpu.rim.version_mismatch"]
    assert "545.00" in messages[0]
    assert "550.90.07" in messages[0]
    assert "96.00.5E.00.01" in messages[1]
    assert "96.00.9F.00.01" in messages[1]
    assert verdict.claims[Claim.EXECUTABLES] == 33  # warning: not compared
    assert not any(f.id == "gpu.measurement.mismatch" for f in verdict.findings)


def test_missing_rim_is_a_warning() -> None:
    verdict = check(with_anchors=anchors(rims=FileRims([DRIVER_RIM])))
    message = only(verdict, "gpu.rim.missing")
    assert "VBIOS 96.00.5E.00.01" in message
    assert verdict.claims[Claim.EXECUTABLES] == 33
    assert next(f for f in verdict.findings if f.id == "gpu.rim.missing").severity is (
        Severity.WARNING
    )


class _WrongKind:
    """A RIM source that answers every question with the driver RIM."""

    def find(self, kind: RimKind, version: str) -> Rim | None:
        return DRIVER_RIM


def test_rim_of_the_wrong_kind_is_not_used() -> None:
    verdict = check(with_anchors=anchors(rims=_WrongKind()))
    assert "no VBIOS RIM" in only(verdict, "gpu.rim.missing")


def test_nvml_vbios_differs() -> None:
    verdict = check(gpu=HostGpu(0, "gpu0:GPU-5e", "96.00.5E.00.02"))
    message = only(verdict, "gpu.version.mismatch")
    assert "96.00.5E.00.02" in message
    assert VBIOS in message
    assert verdict.claims[Claim.CONFIGURATION] == 96


def test_nvml_driver_differs() -> None:
    verdict = check(driver="550.90.07")
    message = only(verdict, "gpu.version.mismatch")
    assert "550.90.07" in message
    assert DRIVER in message
    assert verdict.claims[Claim.CONFIGURATION] == 96


def test_nvml_versions_compare_without_case() -> None:
    assert check(gpu=HostGpu(0, "gpu0:GPU-5e", VBIOS.lower())).claims == AFFIRMING


# --- re-signed copies: the checks past the signature -----------------------------------------


def test_measurement_changed_and_resigned_is_a_mismatch_naming_the_index() -> None:
    changed = bytes([0xAB]) * 48
    verdict = check(
        edited(blocks={8: changed}, sign=PKI.leaf_key),
        PKI.chain,
        with_anchors=anchors(PKI.root),
    )
    message = only(verdict, "gpu.measurement.mismatch")
    finding = next(f for f in verdict.findings if f.id == "gpu.measurement.mismatch")
    assert "block 8 (RIM index 7)" in message
    assert "driver RIM (driver 545.00" in message
    assert finding.found == changed.hex()
    assert finding.expected == DRIVER_RIM.measurements[0].alternatives[0].hex()
    assert "GPU 0 (gpu0:GPU-5e) of device dev-3f2a" in message
    assert verdict.claims == {**AFFIRMING, Claim.EXECUTABLES: 96}


def test_one_finding_per_mismatched_index() -> None:
    verdict = check(
        edited(blocks={2: bytes(48), 8: bytes(48)}, sign=PKI.leaf_key),
        PKI.chain,
        with_anchors=anchors(PKI.root),
    )
    assert ids(verdict) == ["gpu.measurement.mismatch"] * 2
    messages = " ".join(f.message for f in verdict.findings)
    assert "VBIOS RIM" in messages
    assert "driver RIM" in messages


def test_nvdec0_disabled_still_compares_rim_index_35() -> None:
    # The recorded report says NVDEC0 disabled (0x55); nvtrust's skip of index 35 never fires
    # (verifier/gpu/appraise.py): block 36 is compared all the same.
    assert spdm.parse_report(REPORT_545).response.opaque["nvdec0_status"] == b"\x55"
    assert any(m.index == 36 for m in DRIVER_RIM.measurements)
    verdict = check(
        edited(blocks={36: bytes(48)}, sign=PKI.leaf_key),
        PKI.chain,
        with_anchors=anchors(PKI.root),
    )
    assert "block 36 (RIM index 35)" in only(verdict, "gpu.measurement.mismatch")


def test_any_alternative_matches_and_size_counts() -> None:
    block8 = spdm.parse_report(REPORT_545).response.blocks[7].value
    other = ReferenceMeasurement(8, (bytes(48), block8), 48, "Measurement_7")
    rim = dataclasses.replace(
        DRIVER_RIM,
        measurements=tuple(other if m.index == 8 else m for m in DRIVER_RIM.measurements),
    )
    assert check(with_anchors=anchors(rims=FileRims([rim, VBIOS_RIM]))).claims == AFFIRMING
    wrong_size = dataclasses.replace(other, size=32)
    rim = dataclasses.replace(
        DRIVER_RIM,
        measurements=tuple(wrong_size if m.index == 8 else m for m in DRIVER_RIM.measurements),
    )
    verdict = check(with_anchors=anchors(rims=FileRims([rim, VBIOS_RIM])))
    assert "block 8" in only(verdict, "gpu.measurement.mismatch")


def test_rim_index_absent_from_report() -> None:
    extra = ReferenceMeasurement(70, (bytes(48),), 48, "Measurement_69")
    rim = dataclasses.replace(DRIVER_RIM, measurements=(*DRIVER_RIM.measurements, extra))
    verdict = check(with_anchors=anchors(rims=FileRims([rim, VBIOS_RIM])))
    message = only(verdict, "gpu.measurement.missing")
    assert "block 70 (RIM index 69)" in message
    assert verdict.claims[Claim.EXECUTABLES] == 96


def test_driver_and_vbios_rims_active_at_one_index() -> None:
    clash = next(m for m in DRIVER_RIM.measurements if m.index == 8)
    vbios = dataclasses.replace(VBIOS_RIM, measurements=(*VBIOS_RIM.measurements, clash))
    verdict = check(with_anchors=anchors(rims=FileRims([DRIVER_RIM, vbios])))
    assert "RIM index 7" in only(verdict, "gpu.rim.index_conflict")
    assert verdict.claims[Claim.EXECUTABLES] == 96


# --- the whole body: nonces per challenge and index, listed GPUs, duplicates ------------------

CHALLENGE = bytes(range(32))


def _resigned(index: int, pki: Pki = PKI, challenge: bytes = CHALLENGE) -> GpuEvidence:
    report = edited(nonce=gpu_nonce(challenge, index), sign=pki.leaf_key)
    return GpuEvidence(index, REPORT, "", report, pki.chain)


def gpus_verdicts(
    reports: list[GpuEvidence],
    gpus: list[HostGpu],
    *,
    required: bool = False,
    roots: tuple[x509.Certificate, ...] | None = None,
    challenge: bytes = CHALLENGE,
) -> tuple[GpuVerdict, ...]:
    return appraise_gpus(
        reports,
        gpus,
        driver_version=DRIVER,
        challenge_nonce=challenge,
        anchors=anchors(*(roots or (PKI.root,))),
        now=NOW,
        device_id=DEVICE,
        required=required,
    )


def test_each_gpu_answers_its_own_nonce() -> None:
    other = make_pki(" 1")
    gpus = [HostGpu(0, "gpu0:a", VBIOS), HostGpu(1, "gpu1:b", VBIOS)]
    verdicts = gpus_verdicts(
        [_resigned(0), _resigned(1, other)], gpus, roots=(PKI.root, other.root)
    )
    assert [(v.index, v.name, v.claims) for v in verdicts] == [
        (0, "gpu0:a", AFFIRMING),
        (1, "gpu1:b", AFFIRMING),
    ]
    # GPU 1's report sent as GPU 0's (index 0 answered GPU 1's nonce): a replay.
    swapped = dataclasses.replace(_resigned(1, other), index=0)
    verdicts = gpus_verdicts([swapped], gpus[:1], roots=(PKI.root, other.root))
    assert ids(verdicts[0]) == ["gpu.report.nonce_mismatch"]


def test_report_from_an_earlier_challenge_is_replayed() -> None:
    verdicts = gpus_verdicts([_resigned(0, challenge=b"\x01" * 32)], [GPU0])
    assert ids(verdicts[0]) == ["gpu.report.nonce_mismatch"]
    assert verdicts[0].claims == {Claim.INSTANCE_IDENTITY: 99}


def test_recorded_report_cannot_answer_a_challenge() -> None:
    verdicts = gpus_verdicts(
        [GpuEvidence(0, REPORT, "", REPORT_545, CHAIN_545)], [GPU0], roots=(DEVICE_ROOT,)
    )
    assert ids(verdicts[0]) == ["gpu.report.nonce_mismatch"]


def test_two_gpus_with_one_attestation_key() -> None:
    gpus = [HostGpu(0, "gpu0:a", VBIOS), HostGpu(1, "gpu1:b", VBIOS)]
    verdicts = gpus_verdicts([_resigned(0), _resigned(1)], gpus)
    assert [ids(v) for v in verdicts] == [["gpu.identity.duplicate"]] * 2
    first = next(f for f in verdicts[0].findings if f.id == "gpu.identity.duplicate")
    assert "GPU 1 (gpu1:b)" in first.message
    assert first.subject == "gpu0:a"
    assert all(v.claims[Claim.INSTANCE_IDENTITY] == 96 for v in verdicts)


def test_one_key_under_two_certificates_is_still_one_gpu() -> None:
    """The identity is the attestation key, not the certificate's bytes: a host can present
    one GPU's key under another certificate (a second one for the same key, or the same one
    with its ECDSA signature's s replaced by n - s, which verifies too) for a second index."""
    again = _cert("devtrust test GPU attestation key", PKI.leaf_key, PKI.ica, PKI.ica_key, ca=False)
    assert again.public_bytes(Encoding.DER) != PKI.leaf.public_bytes(Encoding.DER)
    other_chain = (again.public_bytes(Encoding.DER), *PKI.chain[1:])
    second = GpuEvidence(
        1, REPORT, "", edited(nonce=gpu_nonce(CHALLENGE, 1), sign=PKI.leaf_key), other_chain
    )
    gpus = [HostGpu(0, "gpu0:a", VBIOS), HostGpu(1, "gpu1:b", VBIOS)]
    verdicts = gpus_verdicts([_resigned(0), second], gpus)
    assert [ids(v) for v in verdicts] == [["gpu.identity.duplicate"]] * 2


def test_a_duplicate_finding_names_a_few_others_and_counts_the_rest() -> None:
    """Its text grows with the GPU count, not with its square."""
    gpus = [HostGpu(i, f"gpu{i}:x", VBIOS) for i in range(8)]
    verdicts = gpus_verdicts([_resigned(i) for i in range(8)], gpus)
    first = next(f for f in verdicts[0].findings if f.id == "gpu.identity.duplicate")
    assert first.found == "shared with GPU 1 (gpu1:x), GPU 2 (gpu2:x), GPU 3 (gpu3:x) and 4 more"


def test_report_for_an_unlisted_index() -> None:
    verdicts = gpus_verdicts([_resigned(0), _resigned(5)], [GPU0])
    assert [v.index for v in verdicts] == [0, 5]
    assert ids(verdicts[0]) == []
    finding = verdicts[1].findings[0]
    assert (finding.id, finding.severity, finding.found) == (
        "gpu.report.unknown_index",
        Severity.CONTRAINDICATED,
        "5",
    )
    assert "an index among 0" in finding.expected
    assert verdicts[1].claims == {Claim.HARDWARE: 96}


def test_two_reports_for_one_index() -> None:
    verdicts = gpus_verdicts([_resigned(0), _resigned(0)], [GPU0])
    assert ids(verdicts[0]) == ["gpu.report.malformed"]


def test_required_without_a_report() -> None:
    gpus = [HostGpu(0, "gpu0:a", VBIOS), HostGpu(1, "gpu1:b", VBIOS)]
    verdicts = gpus_verdicts(
        [GpuEvidence(0, UNSUPPORTED, "not Hopper or later")], gpus, required=True
    )
    assert [ids(v) for v in verdicts] == [["gpu.attestation.required"]] * 2
    assert "unsupported: not Hopper or later" in verdicts[0].findings[0].message
    assert "no GPU report" in verdicts[1].findings[0].message
    assert all(v.claims == {Claim.HARDWARE: 96} for v in verdicts)
    # No reports at all (an old agent) in a zone that requires them: the same.
    verdicts = gpus_verdicts([], gpus, required=True)
    assert [ids(v) for v in verdicts] == [["gpu.attestation.required"]] * 2


def test_required_with_a_verified_report_is_affirming() -> None:
    verdicts = gpus_verdicts([_resigned(0)], [GPU0], required=True)
    assert verdicts[0].claims == AFFIRMING


def test_unavailable_is_info_only_when_a_report_said_so() -> None:
    gpus = [HostGpu(0, "gpu0:a", VBIOS), HostGpu(1, "gpu1:b", VBIOS)]
    verdicts = gpus_verdicts([GpuEvidence(0, ERROR, "NVML: Not Supported")], gpus)
    assert [[(f.id, f.severity) for f in v.findings] for v in verdicts] == [
        [("gpu.attestation.unavailable", Severity.INFO)]
    ] * 2
    assert all(v.claims == {} for v in verdicts)
    assert "error: NVML: Not Supported" in verdicts[0].findings[0].message
    # An agent from before GPU attestation sent none: nothing at all.
    assert gpus_verdicts([], gpus) == ()


# --- revocation in the appraisal -----------------------------------------------------------


def _crl(
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    revoked: list[int],
    *,
    this_update: datetime = NOW - timedelta(hours=1),
) -> tuple[str, bytes]:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(this_update + timedelta(days=30))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    crl = builder.sign(key, hashes.SHA384())
    return f"{issuer.subject.rfc4514_string()}.crl", crl.public_bytes(Encoding.DER)


def _with_revocation(files: list[tuple[str, bytes]]) -> GpuVerdict:
    return check(
        edited(sign=PKI.leaf_key),
        PKI.chain,
        with_anchors=anchors(PKI.root, revocation=Revocations.from_files(files)),
    )


def test_revoked_gpu_leaf() -> None:
    verdict = _with_revocation(
        [
            _crl(PKI.ica, PKI.ica_key, [PKI.leaf.serial_number]),
            _crl(PKI.root, PKI.root_key, []),
        ]
    )
    message = only(verdict, "gpu.certificate.revoked")
    assert f"serial {PKI.leaf.serial_number:x}" in message
    assert verdict.claims[Claim.HARDWARE] == 96


def test_revoked_intermediate() -> None:
    verdict = _with_revocation(
        [
            _crl(PKI.ica, PKI.ica_key, []),
            _crl(PKI.root, PKI.root_key, [PKI.ica.serial_number]),
        ]
    )
    assert "devtrust test GPU ICA" in only(verdict, "gpu.certificate.revoked")


def test_fresh_crls_for_every_certificate_are_silent() -> None:
    verdict = _with_revocation([_crl(PKI.ica, PKI.ica_key, []), _crl(PKI.root, PKI.root_key, [])])
    assert verdict.findings == ()
    assert verdict.claims == AFFIRMING


def test_stale_crl_names_its_age() -> None:
    verdict = _with_revocation(
        [
            _crl(PKI.ica, PKI.ica_key, [], this_update=NOW - timedelta(days=10)),
            _crl(PKI.root, PKI.root_key, []),
        ]
    )
    message = only(verdict, "gpu.revocation.stale")
    assert "10.0 days old" in message
    assert "7.0 days" in message
    assert verdict.claims[Claim.HARDWARE] == 32


def test_crl_for_part_of_the_chain_leaves_the_rest_unknown() -> None:
    verdict = _with_revocation([_crl(PKI.ica, PKI.ica_key, [])])
    assert ids(verdict) == []
    unknown = [f for f in verdict.findings if f.id == "gpu.revocation.unknown"]
    assert len(unknown) == 1
    assert "devtrust test GPU ICA" in unknown[0].message


def test_crl_signed_by_another_key_does_not_count() -> None:
    forger = ec.generate_private_key(ec.SECP384R1())
    verdict = _with_revocation([_crl(PKI.ica, forger, []), _crl(PKI.root, PKI.root_key, [])])
    unknown = [f for f in verdict.findings if f.id == "gpu.revocation.unknown"]
    assert len(unknown) == 1
    assert "signature does not verify" in unknown[0].message


@pytest.mark.parametrize("status", [UNSUPPORTED, ERROR])
def test_appraise_report_without_a_report(status: str) -> None:
    verdict = appraise_report(
        GpuEvidence(0, status, "why"),
        GPU0,
        driver_version=DRIVER,
        expected_nonce=None,
        anchors=anchors(),
        now=NOW,
        device_id=DEVICE,
    )
    assert [f.id for f in verdict.findings] == ["gpu.attestation.unavailable"]


# --- the chain cache ----------------------------------------------------------------------


def test_chain_cache_holds_a_verified_chain() -> None:
    cached = anchors()
    assert check(with_anchors=cached).claims == AFFIRMING
    assert len(cached.chains) == 1
    assert check(with_anchors=cached).claims == AFFIRMING
    # A chain that does not verify is not cached.
    check(edited(sign=PKI.leaf_key), PKI.chain, with_anchors=cached)
    assert len(cached.chains) == 1


def test_chain_cache_hit_is_only_within_the_validity_window() -> None:
    cached = anchors(PKI.root)
    report = edited(sign=PKI.leaf_key)
    assert check(report, PKI.chain, with_anchors=cached).claims == AFFIRMING
    late = PKI.leaf.not_valid_after_utc + timedelta(days=1)
    verdict = check(report, PKI.chain, with_anchors=cached, now=late)
    assert ids(verdict) == ["gpu.certificate.chain_invalid"]


def test_chain_cache_is_per_root() -> None:
    shared = ChainCache()
    trusting = GpuAnchors(device_roots=(PKI.root,), rims=RIMS, chains=shared)
    report = edited(sign=PKI.leaf_key)
    assert check(report, PKI.chain, with_anchors=trusting).claims == AFFIRMING
    other = GpuAnchors(device_roots=(DEVICE_ROOT,), rims=RIMS, chains=shared)
    verdict = check(report, PKI.chain, with_anchors=other)
    assert ids(verdict) == ["gpu.certificate.chain_invalid"]


def test_chain_cache_is_bounded() -> None:
    cache = ChainCache(size=2)
    for n in range(5):
        cache.put(bytes([n]) * 32, [PKI.leaf, PKI.ica, PKI.root])
    assert len(cache) == 2
    assert cache.get(bytes([4]) * 32, NOW) is not None
    assert cache.get(bytes([0]) * 32, NOW) is None


def test_naive_time_is_caller_misuse() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check(now=datetime(2026, 12, 1))


# --- the report's FWID against the attestation key certificate's (TCG DICE) ----------------

HOPPER = spdm.parse_report(REPORT_HOPPER)


def _stated_fwid(report: spdm.SpdmReport) -> bytes:
    fwid = report.response.opaque["fwid"]
    assert isinstance(fwid, bytes)
    return fwid


HOPPER_FWID = _stated_fwid(HOPPER)  # f5c384ae...: its leaf declares the same
HOPPER_GPU = HostGpu(0, "gpu0:GPU-9f", "96.00.9F.00.01")
SHA384_OID = bytes.fromhex("0609608648016503040202")  # 2.16.840.1.101.3.4.2.2


def der(tag: int, content: bytes) -> bytes:
    size = len(content)
    length = bytes([size]) if size < 0x80 else bytes([0x81, size])
    assert size < 0x100
    return bytes([tag]) + length + content


def fwid_der(digest: bytes, oid: bytes = SHA384_OID) -> bytes:
    return der(0x30, oid + der(0x04, digest))


def dice_tcb_info(*digests: bytes) -> bytes:
    """DiceTcbInfo { vendor [0], model [1], layer [4], fwids [6] } as Blackwell leaves."""
    fwids = b"".join(fwid_der(d) for d in digests)
    return der(
        0x30,
        der(0x80, b"devtrust test") + der(0x81, b"GH100") + der(0x84, b"\x01") + der(0xA6, fwids),
    )


def riot_composite(digest: bytes) -> bytes:
    """RIoT CompositeDeviceID { version 1, deviceID SPKI, fwid } as NVIDIA's Hopper leaves."""
    spki = PKI.ica.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der(0x30, der(0x02, b"\x01") + spki + fwid_der(digest))


def tcb_leaf(
    value: bytes | None, oid: str = "2.23.133.5.4.1"
) -> tuple[tuple[bytes, ...], ec.EllipticCurvePrivateKey]:
    """A chain (leaf, PKI's ICA, root) whose leaf carries ``value`` as its DICE extension
    (None: no extension), and the leaf's key."""
    key = ec.generate_private_key(ec.SECP384R1())
    extra = (
        () if value is None else (x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value),)
    )
    leaf = _cert("devtrust test GPU FMC LF", key, PKI.ica, PKI.ica_key, ca=False, extra=extra)
    return (leaf.public_bytes(Encoding.DER), *PKI.chain[1:]), key


def check_hopper(
    value: bytes | None, oid: str = "2.23.133.5.4.1", report: bytes = REPORT_HOPPER
) -> GpuVerdict:
    """``report`` (the Hopper one: it states a FWID) re-signed by a test leaf carrying
    ``value``, under the test root given as the anchor; no RIM applies (warnings only)."""
    chain, key = tcb_leaf(value, oid)
    parsed = spdm.parse_report(report)
    return check(
        edited(report, sign=key),
        chain,
        gpu=HostGpu(0, "gpu0:GPU-9f", parsed.vbios_version),
        driver=parsed.driver_version,
        nonce=parsed.request.nonce,
        with_anchors=anchors(PKI.root, rims=FileRims([])),
    )


def contraindicated(verdict: GpuVerdict) -> list[Finding]:
    return [f for f in verdict.findings if f.severity is Severity.CONTRAINDICATED]


def fwid_finding(verdict: GpuVerdict) -> Finding:
    """The one contraindicated finding, which must be the FWID one."""
    bad = contraindicated(verdict)
    assert [f.id for f in bad] == ["gpu.certificate.fwid_mismatch"], verdict.findings
    assert verdict.claims[Claim.HARDWARE] == 97
    assert bad[0].subject == "gpu0:GPU-9f"
    return bad[0]


def test_corpus_reports_fwids_against_their_leaves() -> None:
    # The Hopper (550.90.07) report states a FWID; its leaf declares it in RIoT's
    # CompositeDeviceID under 2.23.133.5.4.1: they match, and the report verifies clean.
    leaf = x509.load_der_x509_certificate(CHAIN_HOPPER[0])
    declared = spdm.certificate_fwid(leaf)
    assert declared is not None
    assert declared.digest == HOPPER_FWID
    verdict = check(
        REPORT_HOPPER, CHAIN_HOPPER, gpu=HOPPER_GPU, driver="550.90.07", nonce=HOPPER.request.nonce
    )
    assert contraindicated(verdict) == []
    assert verdict.claims[Claim.HARDWARE] == 2
    # The 545.00 report (older firmware) states none: nvtrust skips the comparison, so do we,
    # though its leaf declares one.
    assert "fwid" not in spdm.parse_report(REPORT_545).response.opaque
    assert spdm.certificate_fwid(x509.load_der_x509_certificate(CHAIN_545[0])) is not None
    assert check().claims == AFFIRMING


@pytest.mark.parametrize(
    ("value", "oid"),
    [
        pytest.param(dice_tcb_info(HOPPER_FWID), "2.23.133.5.4.1", id="dice-tcbinfo"),
        pytest.param(dice_tcb_info(HOPPER_FWID, bytes(48)), "2.23.133.5.4.1", id="first-of-two"),
        pytest.param(riot_composite(HOPPER_FWID), "2.23.133.5.4.1", id="riot-composite"),
        pytest.param(der(0x30, dice_tcb_info(HOPPER_FWID)), "2.23.133.5.4.5", id="multi-tcbinfo"),
    ],
)
def test_test_leaf_with_the_reports_fwid_is_clean(value: bytes, oid: str) -> None:
    verdict = check_hopper(value, oid)
    assert contraindicated(verdict) == []
    assert verdict.claims[Claim.HARDWARE] == 2


@pytest.mark.parametrize(
    ("value", "oid", "source"),
    [
        pytest.param(dice_tcb_info(bytes(48)), "2.23.133.5.4.1", "TCG DICE TcbInfo", id="dice"),
        pytest.param(
            dice_tcb_info(bytes(48), HOPPER_FWID),
            "2.23.133.5.4.1",
            "TCG DICE TcbInfo",
            id="second-of-two",
        ),
        pytest.param(
            riot_composite(bytes(48)), "2.23.133.5.4.1", "RIoT CompositeDeviceID", id="riot"
        ),
        pytest.param(
            der(0x30, dice_tcb_info(bytes(48))), "2.23.133.5.4.5", "MultiTcbInfo", id="multi"
        ),
    ],
)
def test_leaf_declaring_another_fwid_is_a_finding(value: bytes, oid: str, source: str) -> None:
    finding = fwid_finding(check_hopper(value, oid))
    assert HOPPER_FWID.hex() in finding.message
    assert bytes(48).hex() in finding.message
    assert source in finding.message
    assert "devtrust test GPU FMC LF" in finding.message
    assert finding.expected == f"{HOPPER_FWID.hex()} (report)"
    assert finding.found == f"{bytes(48).hex()} (certificate)"


def test_leaf_without_tcb_info_is_a_finding() -> None:
    finding = fwid_finding(check_hopper(None))
    assert "has no TCG DICE TcbInfo extension" in finding.message
    assert "2.23.133.5.4.1" in finding.message
    assert HOPPER_FWID.hex() in finding.message
    assert finding.found == "no FWID in the certificate"


def test_report_without_fwid_is_not_compared() -> None:
    # The 545 report, re-signed by leaves that declare another FWID or none: not compared.
    for value in (dice_tcb_info(bytes(48)), None):
        verdict = check_hopper(value, report=REPORT_545)
        assert contraindicated(verdict) == []


_GOOD_FWID = fwid_der(HOPPER_FWID)
MALFORMED = [
    pytest.param(dice_tcb_info(HOPPER_FWID)[:-1], "bytes left", id="truncated"),
    pytest.param(dice_tcb_info(HOPPER_FWID) + b"\x00", "extension value", id="trailing-bytes"),
    pytest.param(b"\x30\x80" + _GOOD_FWID + b"\x00\x00", "indefinite", id="indefinite-length"),
    pytest.param(der(0x30, der(0x80, b"v") + der(0x84, b"\x01")), "without one", id="no-fwids"),
    pytest.param(der(0x30, b""), "without one", id="empty-sequence"),
    pytest.param(der(0x30, der(0xA6, b"")), "SIZE (1..MAX)", id="empty-fwids"),
    pytest.param(
        der(0x30, der(0xA6, fwid_der(HOPPER_FWID[:47]))),
        "48 bytes (SHA-384)",
        id="short-sha384-digest",
    ),
    pytest.param(der(0x30, der(0x86, _GOOD_FWID)), "constructed", id="primitive-fwids"),
    pytest.param(
        der(0x30, der(0xA6, _GOOD_FWID) + der(0x81, b"m")), "ascending", id="out-of-order"
    ),
    pytest.param(
        der(0x30, der(0x0C, b"v") + der(0xA6, _GOOD_FWID)), "context-specific", id="universal-field"
    ),
    pytest.param(
        der(0x30, der(0xA6, der(0x30, der(0x04, HOPPER_FWID)))), "hashAlg", id="fwid-without-oid"
    ),
    pytest.param(
        der(0x30, der(0xA6, der(0x30, b"\x06\x02\x60\x86" + der(0x04, HOPPER_FWID)))),
        "complete last subidentifier",
        id="truncated-oid",
    ),
    pytest.param(der(0x31, dice_tcb_info(HOPPER_FWID)[2:]), "tag 0x30", id="a-set"),
    pytest.param(
        der(0x30, der(0x02, b"\x01") + der(0x30, b"")),
        "CompositeDeviceID fwid",
        id="riot-without-fwid",
    ),
    pytest.param(b"\x30\x82\x00\x05" + b"\x00" * 5, "shortest length", id="non-minimal-length"),
]


@pytest.mark.parametrize(("value", "why"), MALFORMED)
def test_malformed_tcb_info_is_a_finding_naming_why(value: bytes, why: str) -> None:
    finding = fwid_finding(check_hopper(value))
    assert why in finding.message
    assert "2.23.133.5.4.1" in finding.message
    assert "offset" in finding.message
    assert finding.found == "a TCG DICE extension that does not parse"
