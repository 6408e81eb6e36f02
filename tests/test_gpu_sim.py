"""Simulated NVIDIA GPUs (swtpm/gpu_sim.py): their SPDM reports parse and verify with the
verifier's own code, chain to the simulation's roots (never to NVIDIA's), their RIMs are
signed SWID tags in NVIDIA's shape that match the reports, and each fault makes exactly the
difference it names."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import stat
import struct
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lxml import etree
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidSignature
from signxml.verifier import SignatureConfiguration, VerifyResult, XMLVerifier

from devtrust.core.binding import gpu_nonce
from devtrust.core.errors import DevtrustError
from devtrust.swtpm import gpu_sim, sim_args
from devtrust.swtpm.gpu_sim import GpuFault, SimAttester, SimGpu, SimGpuFleet, SimGpuRoots
from devtrust.swtpm.sim_faults import FINDINGS, GPU_FAULTS, faults_per_kind, parse_faults, plan
from devtrust.swtpm.simulate import build_parser
from devtrust.verifier.config import GpuConfig
from devtrust.verifier.gpu import spdm
from devtrust.verifier.gpu.anchors import GpuAnchorsHolder
from devtrust.verifier.gpu.appraise import GpuAnchors, HostGpu, appraise_gpus
from devtrust.verifier.gpu.revocation import Revocations
from devtrust.verifier.gpu.rim import RimSignatureError, load_rim
from devtrust.verifier.gpu.types import GpuEvidence, RimKind
from devtrust.verifier.trust import Finding, Severity
from tests.corpus import corpus_root

CORPUS = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
SHIPPED_ROOTS = Path(spdm.__file__).resolve().parents[1] / "data" / "gpu-roots"
SWID = "{http://standards.iso.org/iso/19770/-2/2015/schema.xsd}"
SHA384_NS = "{http://www.w3.org/2001/04/xmlenc#sha384}"
# One time for the module: fixtures made minutes after collection (a whole suite) must not
# issue CRLs "from the future" of the time the tests appraise at.
NOW = datetime.now(UTC)
NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> SimGpuRoots:
    return SimGpuRoots.create(tmp_path_factory.mktemp("gpu-roots"), now=NOW)


@pytest.fixture(scope="module")
def gpu(roots: SimGpuRoots) -> SimGpu:
    return SimGpu.create(roots, 0, now=NOW)


def _chain(gpu: SimGpu) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in gpu.certificates()]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _verified_rim(roots: SimGpuRoots, data: bytes) -> etree._Element:
    """The signed content of a simulated RIM, verified as the verifier does it (signxml with
    the signer's certificate, ecdsa-sha384 and sha384 required), the signer issued by the
    simulation's RIM root."""
    roots.rim_signer.verify_directly_issued_by(roots.rim_root)
    config = SignatureConfiguration(
        signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
    )
    result = XMLVerifier().verify(data, x509_cert=_pem(roots.rim_signer), expect_config=config)
    assert isinstance(result, VerifyResult)
    signed = result.signed_xml
    assert signed is not None
    return signed


def _active(signed: etree._Element) -> dict[int, tuple[bytes, ...]]:
    out: dict[int, tuple[bytes, ...]] = {}
    for resource in signed.iter(f"{SWID}Resource"):
        if resource.get("active") != "True":
            continue
        count = int(resource.get("alternatives", "0"))
        out[int(resource.get("index", "-1"))] = tuple(
            bytes.fromhex(resource.get(f"{SHA384_NS}Hash{n}", "")) for n in range(count)
        )
    return out


def _mismatches(report: spdm.SpdmReport, *rims: dict[int, tuple[bytes, ...]]) -> list[int]:
    """The SPDM block indices whose value no RIM allows (RIM index i is block i + 1)."""
    blocks = {block.index: block.value for block in report.response.blocks}
    return sorted(
        index + 1
        for rim in rims
        for index, allowed in rim.items()
        if blocks.get(index + 1) not in allowed
    )


# -- the report --------------------------------------------------------------------------


def test_report_parses_with_the_verifiers_parser(gpu: SimGpu) -> None:
    data = gpu.report(NONCE)
    report = spdm.parse_report(data)
    assert data[:4] == bytes.fromhex("11e001ff")
    assert report.request.nonce == NONCE
    assert report.request.slot_id == 0
    assert report.request.raw == data[:37]
    response = report.response
    assert (response.version, response.param1, response.param2) == (0x11, 0, 0)
    assert [block.index for block in response.blocks] == list(range(1, 65))
    assert {(b.specification, b.value_type, len(b.value)) for b in response.blocks} == {(1, 1, 48)}
    assert report.driver_version == "550.90.07"
    assert report.vbios_version == "96.00.9F.00.01"
    opaque = response.opaque
    assert (opaque["project"], opaque["project_sku"], opaque["chip_sku"]) == (
        "1010",
        "0200",
        "882",
    )
    assert opaque["nvdec0_status"] == bytes([gpu_sim.NVDEC0_ENABLED])
    assert len(response.signature) == 96
    assert data.endswith(response.signature)


def test_report_has_the_recorded_reports_layout(gpu: SimGpu) -> None:
    """The opaque records come in the order of nvtrust's recorded 550.90.07 report (the
    simulation's default driver; it states its FWID, field 20, which the 545.00 report's
    older firmware does not), and the VBIOS version is encoded as NVIDIA encodes it."""
    recorded = spdm.parse_report_hex((CORPUS / "hopperAttestationReport.txt").read_text())

    def kinds(opaque: bytes) -> list[int]:
        out, pos = [], 0
        while pos < len(opaque):
            kind, size = struct.unpack_from("<HH", opaque, pos)
            out.append(kind)
            pos += 4 + size
        return out

    # The recorded one also carries the MSR counters, CPR info and protected PCIe status
    # (12, 13, 21); the rest match.
    recorded_kinds = [k for k in kinds(recorded.response.opaque_data) if k not in (12, 13, 21)]
    assert 20 in recorded_kinds
    simulated = spdm.parse_report(gpu.report(NONCE)).response.opaque_data
    assert kinds(simulated) == recorded_kinds
    version_record = recorded.response.opaque_data[4:12]
    assert gpu_sim._vbios_bytes(recorded.vbios_version or "") == version_record


def test_each_report_has_a_fresh_responder_nonce(gpu: SimGpu) -> None:
    first, second = (spdm.parse_report(gpu.report(NONCE)) for _ in range(2))
    assert first.response.nonce != second.response.nonce
    assert first.response.blocks == second.response.blocks


@pytest.mark.parametrize("size", [0, 31, 33])
def test_report_refuses_a_nonce_of_the_wrong_size(gpu: SimGpu, size: int) -> None:
    with pytest.raises(ValueError, match=f"expected 32 bytes, found {size}"):
        gpu.report(bytes(size))


def test_signature_verifies_with_the_leaf_and_breaks_with_one_byte(gpu: SimGpu) -> None:
    data = gpu.report(NONCE)
    leaf = _chain(gpu)[0]
    spdm.verify_signature(spdm.parse_report(data), leaf)
    for offset in (10, 37 + 20, len(data) - 100, len(data) - 1):  # nonce, block, opaque, sig
        broken = bytearray(data)
        broken[offset] ^= 0x01
        with pytest.raises(spdm.SpdmSignatureError):
            spdm.verify_signature(spdm.parse_report(bytes(broken)), leaf)


def test_signature_is_the_gpus_own(roots: SimGpuRoots, gpu: SimGpu) -> None:
    other = SimGpu.create(roots, 1)
    with pytest.raises(spdm.SpdmSignatureError):
        spdm.verify_signature(spdm.parse_report(gpu.report(NONCE)), _chain(other)[0])


def test_chain_verifies_to_the_simulation_root_only(roots: SimGpuRoots, gpu: SimGpu) -> None:
    chain = _chain(gpu)
    path = spdm.verify_chain(chain, roots.device_root, NOW)
    assert path[0] == gpu.leaf
    assert path[-1] == roots.device_root
    nvidia = x509.load_pem_x509_certificate(
        (SHIPPED_ROOTS / "nvidia-device-identity-ca.pem").read_bytes()
    )
    with pytest.raises(spdm.SpdmChainError):
        spdm.verify_chain(chain, nvidia, NOW)
    other = SimGpuRoots.create(roots.directory / "other")
    with pytest.raises(spdm.SpdmChainError):
        spdm.verify_chain(chain, other.device_root, NOW)


def test_certificates_are_p384_and_say_simulation(roots: SimGpuRoots, gpu: SimGpu) -> None:
    certs = [*_chain(gpu), roots.rim_root, roots.rim_signer]
    for cert in certs:
        subject = cert.subject.rfc4514_string()
        assert "devtrust simulation" in subject
        assert "NOT NVIDIA" in subject
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == "secp384r1"
    san = gpu.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n.type_id.dotted_string for n in san] == ["1.3.6.1.4.1.412.274.1"]


def test_gpus_have_distinct_identities(roots: SimGpuRoots) -> None:
    a, b = SimGpu.create(roots, 0), SimGpu.create(roots, 0)
    assert a.leaf.public_bytes(serialization.Encoding.DER) != b.leaf.public_bytes(
        serialization.Encoding.DER
    )
    assert a.measurements == b.measurements  # same versions: same golden values


def test_leaf_declares_the_reports_fwid(roots: SimGpuRoots, gpu: SimGpu) -> None:
    # NVIDIA's verifier requires the report's FWID (opaque field 20) to be the one in the
    # attestation key's certificate (TCG DICE TcbInfo): the simulation's are the same bytes,
    # one per firmware (VBIOS version), read with the verifier's own DER reader.
    stated = spdm.parse_report(gpu.report(NONCE)).response.opaque["fwid"]
    declared = spdm.certificate_fwid(gpu.leaf)
    assert declared is not None
    assert declared.digest == stated == gpu.fwid == gpu_sim.firmware_id(gpu.vbios_version)
    assert (declared.hash_name, declared.source) == (
        "SHA-384",
        "TCG DICE TcbInfo (2.23.133.5.4.1)",
    )
    other = SimGpu.create(roots, 1, vbios_version="96.00.5E.00.01")
    assert other.fwid != gpu.fwid
    assert spdm.certificate_fwid(gpu.twin(roots).leaf) == declared
    # The revoked fault swaps in the twin's key, certificate and firmware ID together.
    attester = SimAttester([gpu])
    attester.inject(GpuFault.REVOKED, 0, revoked=other)
    message = attester.attest(0, NONCE)
    leaf = x509.load_der_x509_certificate(message.certificates[0])
    swapped = spdm.certificate_fwid(leaf)
    assert swapped is not None
    assert spdm.parse_report(message.report).response.opaque["fwid"] == swapped.digest


def test_tcb_info_refuses_a_digest_of_another_size() -> None:
    with pytest.raises(ValueError, match="48 bytes"):
        gpu_sim.tcb_info(bytes(32))


def test_malformed_vbios_version_is_refused(roots: SimGpuRoots) -> None:
    with pytest.raises(ValueError, match="five groups of two hex digits"):
        SimGpu.create(roots, 0, vbios_version="96.00.9F.00")


# -- roots on disk -----------------------------------------------------------------------


def test_roots_round_trip_and_keys_are_private(roots: SimGpuRoots) -> None:
    loaded = SimGpuRoots.load(roots.directory)
    assert loaded.device_root == roots.device_root
    assert loaded.device_ca == roots.device_ca
    assert loaded.rim_signer == roots.rim_signer
    assert SimGpuRoots.open(roots.directory).rim_root == roots.rim_root
    for name in SimGpuRoots.FILES.values():
        if name.endswith(".key"):
            assert stat.S_IMODE((roots.directory / name).stat().st_mode) == 0o600
    assert roots.device_root_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gpu-device-root\.pem: no such file"):
        SimGpuRoots.load(tmp_path)


# -- RIMs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rims(roots: SimGpuRoots, gpu: SimGpu) -> tuple[bytes, bytes]:
    return (
        gpu_sim.driver_rim(roots, gpu.driver_version),
        gpu_sim.vbios_rim(roots, gpu.vbios_version),
    )


def test_rims_verify_and_match_the_report(
    roots: SimGpuRoots, gpu: SimGpu, rims: tuple[bytes, bytes]
) -> None:
    driver, vbios = (_active(_verified_rim(roots, data)) for data in rims)
    assert set(driver) == gpu_sim.DRIVER_ACTIVE
    assert set(vbios) == gpu_sim.VBIOS_ACTIVE
    assert not set(driver) & set(vbios)
    assert _mismatches(spdm.parse_report(gpu.report(NONCE)), driver, vbios) == []


def test_rims_have_nvidias_shape(roots: SimGpuRoots, rims: tuple[bytes, bytes]) -> None:
    """Element and attribute names, versions and algorithms as in NVIDIA's corpus RIMs."""
    corpus = {
        "driver": CORPUS / "Driver_RIM_test_no_gpu.swidtag",
        "vbios": CORPUS / "1010_0200_882_96005E0001_test_no_gpu.swidtag",
    }
    for kind, data in zip(("driver", "vbios"), rims, strict=True):
        ours = etree.fromstring(data)
        theirs = etree.fromstring(corpus[kind].read_bytes())

        def shape(root: etree._Element) -> list[tuple[str, tuple[str, ...]]]:
            seen: list[tuple[str, tuple[str, ...]]] = []
            for element in root.iter():
                names = tuple(sorted(element.attrib.keys()))
                if element.tag.endswith("Resource"):
                    names = tuple(n for n in names if "Hash" not in n)
                entry = (str(element.tag), names)
                if entry not in seen:
                    seen.append(entry)
            return seen

        assert shape(ours) == shape(theirs)
        # The active indices of the corpus RIM are the simulation's.
        active = gpu_sim.DRIVER_ACTIVE if kind == "driver" else gpu_sim.VBIOS_ACTIVE
        assert frozenset(
            int(r.get("index", "-1"))
            for r in theirs.iter(f"{SWID}Resource")
            if r.get("active") == "True"
        ) == frozenset(active)
        meta = ours.find(f"{SWID}Meta")
        assert meta is not None
        version = meta.get("colloquialVersion")
        assert version == ("550.90.07" if kind == "driver" else "96.00.9F.00.01")
        text = data.decode()
        for algorithm in (
            "http://www.w3.org/2006/12/xml-c14n11",
            "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
            "http://www.w3.org/2000/09/xmldsig#enveloped-signature",
            "http://www.w3.org/2001/04/xmldsig-more#sha384",
        ):
            assert f'Algorithm="{algorithm}"' in text
        certs = re.findall(r"<ds:X509Certificate>(.*?)</ds:X509Certificate>", text, re.S)
        assert len(certs) == 2  # the signer, then the root


def test_rim_with_a_changed_digest_does_not_verify(
    roots: SimGpuRoots, rims: tuple[bytes, bytes]
) -> None:
    driver = rims[0]
    value = gpu_sim.reference_values("driver", "550.90.07")[7][0].hex()
    broken = driver.replace(value.encode(), bytes(48).hex().encode())
    assert broken != driver
    with pytest.raises(InvalidSignature):
        _verified_rim(roots, broken)


def test_rims_load_with_the_verifiers_rim_reader(
    roots: SimGpuRoots, gpu: SimGpu, rims: tuple[bytes, bytes]
) -> None:
    """verifier/gpu/rim.py's load_rim verifies the simulated RIMs against the simulation's
    RIM root (and not against NVIDIA's) and reads what the report matches."""
    loaded = [load_rim(data, roots=[roots.rim_root], at=NOW, source="sim") for data in rims]
    assert [(r.kind, r.version) for r in loaded] == [
        (RimKind.DRIVER, gpu.driver_version),
        (RimKind.VBIOS, gpu.vbios_version),
    ]
    blocks = {b.index: b.value for b in spdm.parse_report(gpu.report(NONCE)).response.blocks}
    for r in loaded:
        for m in r.measurements:
            assert blocks[m.index] in m.alternatives
    nvidia = x509.load_pem_x509_certificate(
        (SHIPPED_ROOTS / "nvidia-corim-signing-root-ca.pem").read_bytes()
    )
    with pytest.raises(RimSignatureError, match="simulation RIM signer"):
        load_rim(rims[0], roots=[nvidia], at=NOW, source="sim")


# -- faults ------------------------------------------------------------------------------


def test_wrong_measurement_differs_from_the_rim_at_one_block(
    roots: SimGpuRoots, gpu: SimGpu, rims: tuple[bytes, bytes]
) -> None:
    driver, vbios = (_active(_verified_rim(roots, data)) for data in rims)
    tampered = gpu.tampered(2)
    report = spdm.parse_report(tampered.report(NONCE))
    spdm.verify_signature(report, _chain(tampered)[0])  # still signed by the GPU
    assert _mismatches(report, driver, vbios) == [2]
    assert _mismatches(spdm.parse_report(gpu.tampered(23).report(NONCE)), driver, vbios) == [23]
    with pytest.raises(ValueError, match="block 65"):
        gpu.tampered(65)


def test_replayed_report_carries_the_earlier_nonce(gpu: SimGpu) -> None:
    attester = SimAttester([gpu])
    first_nonce, second_nonce = gpu_nonce(b"a" * 32, 0), gpu_nonce(b"b" * 32, 0)
    first = attester.attest(0, first_nonce)
    attester.inject(GpuFault.REPLAY, 0)
    replayed = attester.attest(0, second_nonce)
    assert replayed.report == first.report
    report = spdm.parse_report(replayed.report)
    spdm.verify_signature(report, _chain(gpu)[0])  # a genuine report, only stale
    with pytest.raises(spdm.SpdmNonceError, match=second_nonce.hex()):
        spdm.verify_nonce(report, second_nonce)


def test_replay_before_any_report_sends_one_for_another_nonce(gpu: SimGpu) -> None:
    attester = SimAttester([gpu])
    attester.inject(GpuFault.REPLAY, 0)
    with pytest.raises(spdm.SpdmNonceError):
        spdm.verify_nonce(spdm.parse_report(attester.attest(0, NONCE).report), NONCE)


@pytest.fixture(scope="module")
def crls(
    roots: SimGpuRoots, gpu: SimGpu
) -> tuple[SimGpu, x509.CertificateRevocationList, x509.CertificateRevocationList]:
    twin = gpu.twin(roots, now=NOW)
    paths = roots.write_revocation(roots.directory / "revocation", [twin.leaf], now=NOW)
    root_crl, ca_crl = (x509.load_pem_x509_crl(p.read_bytes()) for p in paths)
    return twin, root_crl, ca_crl


def test_revoked_twin_is_in_the_intermediates_crl(
    roots: SimGpuRoots,
    gpu: SimGpu,
    crls: tuple[SimGpu, x509.CertificateRevocationList, x509.CertificateRevocationList],
) -> None:
    twin, root_crl, ca_crl = crls
    assert twin.leaf.serial_number != gpu.leaf.serial_number
    assert (twin.driver_version, twin.vbios_version, twin.measurements) == (
        gpu.driver_version,
        gpu.vbios_version,
        gpu.measurements,
    )
    ca_key, root_key = roots.device_ca.public_key(), roots.device_root.public_key()
    assert isinstance(ca_key, type(root_key))
    assert ca_crl.is_signature_valid(ca_key)  # type: ignore[arg-type]
    assert root_crl.is_signature_valid(root_key)  # type: ignore[arg-type]
    assert ca_crl.issuer == roots.device_ca.subject
    assert ca_crl.get_revoked_certificate_by_serial_number(twin.leaf.serial_number) is not None
    assert ca_crl.get_revoked_certificate_by_serial_number(gpu.leaf.serial_number) is None
    assert list(root_crl) == []
    assert ca_crl.next_update_utc is not None
    assert ca_crl.next_update_utc > NOW
    assert ca_crl.last_update_utc <= NOW + timedelta(seconds=5)
    # The twin is a good GPU in every other way: its chain and signature verify.
    report = spdm.parse_report(twin.report(NONCE))
    spdm.verify_signature(report, _chain(twin)[0])
    spdm.verify_chain(_chain(twin), roots.device_root, NOW)


def test_crl_refuses_a_certificate_another_ca_issued(roots: SimGpuRoots) -> None:
    with pytest.raises(ValueError, match="expected certificates it issued"):
        roots.crls([roots.device_ca])


def test_attester_revoked_fault_swaps_in_the_twin(
    gpu: SimGpu,
    crls: tuple[SimGpu, x509.CertificateRevocationList, x509.CertificateRevocationList],
) -> None:
    twin, _, ca_crl = crls
    attester = SimAttester([gpu], revoked_twins={0: twin})
    before = attester.attest(0, NONCE)
    assert (
        ca_crl.get_revoked_certificate_by_serial_number(
            x509.load_der_x509_certificate(before.certificates[0]).serial_number
        )
        is None
    )
    attester.inject(GpuFault.REVOKED, 0)
    after = attester.attest(0, NONCE)
    leaf = x509.load_der_x509_certificate(after.certificates[0])
    assert leaf == twin.leaf
    assert ca_crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    spdm.verify_signature(spdm.parse_report(after.report), leaf)
    assert attester.faults == {0: GpuFault.REVOKED}


def test_attester_faults_need_their_gpu(gpu: SimGpu) -> None:
    attester = SimAttester([gpu])
    with pytest.raises(ValueError, match="no revoked twin"):
        attester.inject(GpuFault.REVOKED, 0)
    with pytest.raises(ValueError, match=r"GPU 3: expected one of \[0\]"):
        attester.inject(GpuFault.MEASUREMENT, 3)


def test_attester_measurement_fault(roots: SimGpuRoots, gpu: SimGpu) -> None:
    attester = SimAttester([gpu])
    good = spdm.parse_report(attester.attest(0, NONCE).report)
    attester.inject(GpuFault.MEASUREMENT, 0)
    bad = spdm.parse_report(attester.attest(0, NONCE).report)
    differ = [
        a.index for a, b in zip(good.response.blocks, bad.response.blocks, strict=True) if a != b
    ]
    assert differ == [2]


def test_attester_reports(gpu: SimGpu) -> None:
    attester = SimAttester([gpu])
    nonce = os.urandom(32)
    message = attester.attest(0, nonce)
    assert (message.index, message.status, message.detail) == (0, "report", "")
    assert list(message.certificates) == gpu.certificates()
    assert spdm.parse_report(message.report).request.nonce == nonce
    missing = attester.attest(5, nonce)
    assert (missing.index, missing.status, missing.report) == (5, "unsupported", b"")
    assert "no simulated GPU" in missing.detail
    assert attester.reports == 2
    attester.close()


# -- the verifier's appraisal of simulated GPUs -------------------------------------------


@pytest.fixture(scope="module")
def anchors(
    roots: SimGpuRoots,
    gpu: SimGpu,
    rims: tuple[bytes, bytes],
    crls: tuple[SimGpu, x509.CertificateRevocationList, x509.CertificateRevocationList],
) -> GpuAnchors:
    """The verifier's anchors as the simulator configures them: the simulation's device
    root, a RIM store holding the synthesized RIMs, the CRLs revoking the twin."""
    store = gpu_sim.fill_rim_store(
        roots, roots.directory / "rims", [(gpu.driver_version, gpu.vbios_version)]
    )
    return GpuAnchors(
        device_roots=(roots.device_root,),
        rims=store,
        revocation=Revocations.load(roots.directory / "revocation"),
    )


def _appraise(anchors: GpuAnchors, attester: SimAttester, challenge: bytes) -> list[Finding]:
    message = attester.attest(0, gpu_nonce(challenge, 0))
    evidence = GpuEvidence(
        index=0,
        status=message.status,
        report=message.report,
        certificates=tuple(message.certificates),
    )
    (verdict,) = appraise_gpus(
        [evidence],
        [HostGpu(0, "gpu0:sim", "96.00.9F.00.01")],
        driver_version="550.90.07",
        challenge_nonce=challenge,
        anchors=anchors,
        now=NOW,
        device_id="sim-device",
        required=True,
    )
    return list(verdict.findings)


def _ids(findings: list[Finding]) -> list[str]:
    return [f.id for f in findings if f.severity > Severity.INFO]


def test_appraisal_of_a_good_simulated_gpu(anchors: GpuAnchors, gpu: SimGpu) -> None:
    assert _ids(_appraise(anchors, SimAttester([gpu]), b"c" * 32)) == []


def test_appraisal_names_a_leaf_certified_for_other_firmware(
    roots: SimGpuRoots, anchors: GpuAnchors, gpu: SimGpu
) -> None:
    serial = gpu.leaf.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value
    assert isinstance(serial, str)
    key = gpu.key.public_key()
    other = roots.issue_leaf(key, serial=serial, fwid=gpu_sim.firmware_id("96.00.5E.00.01"))
    bare = roots.issue_leaf(key, serial=serial)
    for leaf in (other, bare):
        findings = _appraise(anchors, SimAttester([replace(gpu, leaf=leaf)]), b"f" * 32)
        assert _ids(findings) == ["gpu.certificate.fwid_mismatch"]
        assert gpu.fwid.hex() in findings[0].message
    # Firmware that states no FWID (NVIDIA's older) is not compared, as nvtrust does.
    older = replace(gpu, leaf=bare, fwid=b"")
    assert "fwid" not in spdm.parse_report(older.report(NONCE)).response.opaque
    assert _ids(_appraise(anchors, SimAttester([older]), b"g" * 32)) == []


@pytest.mark.parametrize(
    ("fault", "finding"),
    [
        (GpuFault.MEASUREMENT, "gpu.measurement.mismatch"),
        (GpuFault.REPLAY, "gpu.report.nonce_mismatch"),
        (GpuFault.REVOKED, "gpu.certificate.revoked"),
    ],
)
def test_appraisal_names_each_fault(
    anchors: GpuAnchors,
    gpu: SimGpu,
    crls: tuple[SimGpu, x509.CertificateRevocationList, x509.CertificateRevocationList],
    fault: GpuFault,
    finding: str,
) -> None:
    attester = SimAttester([gpu], revoked_twins={0: crls[0]})
    assert _ids(_appraise(anchors, attester, b"d" * 32)) == []
    attester.inject(fault, 0)
    assert _ids(_appraise(anchors, attester, b"e" * 32)) == [finding]
    assert gpu_sim.FAULT_FINDINGS[fault] == finding


def test_heal_undoes_each_fault(
    gpu: SimGpu,
    crls: tuple[SimGpu, x509.CertificateRevocationList, x509.CertificateRevocationList],
) -> None:
    good = _chain(gpu)[0]
    for fault in GpuFault:
        attester = SimAttester([gpu])
        attester.attest(0, NONCE)
        attester.inject(fault, 0, revoked=crls[0])
        faulty = attester.attest(0, b"n" * 32)
        attester.heal(0)
        healed = attester.attest(0, b"h" * 32)
        report = spdm.parse_report(healed.report)
        assert report.request.nonce == b"h" * 32, fault
        assert x509.load_der_x509_certificate(healed.certificates[0]) == good, fault
        assert report.response.blocks == spdm.parse_report(gpu.report(NONCE)).response.blocks
        assert faulty.report != healed.report
        assert attester.faults == {}


# -- devtrust simulate --gpu-attest -------------------------------------------------------


def _options(*args: str) -> argparse.Namespace:
    opts = build_parser().parse_args(list(args))
    sim_args.check_options(opts)
    return opts


def test_gpu_faults_need_gpu_attest() -> None:
    with pytest.raises(DevtrustError, match="gpu-replay: GPU attestation faults need --gpu-attest"):
        _options("--faults", "1%:pcr,gpu-replay")
    # Every kind, without --gpu-attest: every kind but the GPU ones.
    assert not set(_options("--faults", "1%").faults.kinds) & set(GPU_FAULTS)
    assert set(GPU_FAULTS) <= set(_options("--faults", "1%", "--gpu-attest").faults.kinds)
    with pytest.raises(DevtrustError, match="--gpu-attest needs the embedded verifier"):
        _options(
            "--gpu-attest", "--verifier", "h:1", "--enrollment", "h:2",
            "--ca-bundle", "ca.pem", "--simulation-root", "root",
        )  # fmt: skip


def test_plan_has_gpu_faults_only_when_gpus_attest() -> None:
    spec = parse_faults("1%")
    rng = random.Random(3)  # noqa: S311 - a seeded plan
    without = plan(spec, devices=1000, start=0, end=100, rng=rng)
    assert not {i.kind for i in without} & set(GPU_FAULTS)
    with_gpu = plan(spec, devices=1000, start=0, end=100, rng=random.Random(3), gpu=True)  # noqa: S311
    for kind in GPU_FAULTS:
        assert sum(1 for i in with_gpu if i.kind is kind) == faults_per_kind(spec, 1000) == 10
    assert [k.value for k in GPU_FAULTS] == [f.value for f in GpuFault]
    assert {FINDINGS[k] for k in GPU_FAULTS} == set(gpu_sim.FAULT_FINDINGS.values())


def test_fleet_configures_the_verifier_and_only_hopper_and_later_attest(tmp_path: Path) -> None:
    fleet = SimGpuFleet.prepare(tmp_path, versions=[("580.105.08", "96.00.99.00.01")], revoked=2)
    section = fleet.verifier_config()
    config = GpuConfig(
        device_roots=[Path(p) for p in section["device_roots"]],
        rim_roots=[Path(p) for p in section["rim_roots"]],
        rim_store=Path(section["rim_store"]),
        revocation=Path(section["revocation"]),
    )
    anchors = GpuAnchorsHolder(config).current
    assert anchors.device_roots == (fleet.roots.device_root,)
    assert anchors.rims.find(RimKind.DRIVER, "580.105.08") is not None
    assert anchors.rims.find(RimKind.VBIOS, "96.00.99.00.01") is not None
    attester = fleet.attester(
        [
            (0, "NVIDIA H100 80GB HBM3", "96.00.99.00.01"),
            (1, "NVIDIA A100-SXM4-40GB", "92.00.45.00.03"),
            (2, "NVIDIA GB200", "96.00.9E.00.01"),
            (3, "NVIDIA B200", "not a version"),
        ],
        driver_version="580.105.08",
    )
    assert attester.indices == [0, 2]
    assert attester.attest(1, NONCE).status == "unsupported"
    spares = [fleet.take_revoked(), fleet.take_revoked()]
    assert fleet.take_revoked() is None
    assert all(s is not None for s in spares)
    names = {"NVIDIA H200": True, "NVIDIA GH200": True, "NVIDIA A10": False, "Tesla V100": False}
    assert {name: gpu_sim.attests(name) for name in names} == names


def test_simulate_detects_each_gpu_fault(tmp_path: Path) -> None:
    """A small fleet whose GPUs attest: each GPU fault injected is detected by the embedded
    verifier's own appraisal and recovered from, nothing lost."""
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "devtrust.cli", "simulate", "--quiet", "--gpu-attest",
            "--devices", "12", "--duration", "16", "--interval", "4", "--seed", "3",
            "--faults", "10%:gpu-measurement,gpu-replay,gpu-revoked",
            "--json", str(out), "--work", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    kinds = doc["fault_kinds"]
    assert set(kinds) == {"gpu-measurement", "gpu-replay", "gpu-revoked"}
    for name, kind in kinds.items():
        assert kind["injected"] >= 1, name
        assert kind["detected"] == kind["injected"], (name, kind)
        assert kind["recovered"] == kind["detected"], (name, kind)
    assert doc["lost_results"] == 0
    assert doc["errors"] == {}
    config = (tmp_path / "work" / "verifier" / "verifier.yaml").read_text()
    assert str(tmp_path / "work" / "gpu" / "roots" / "gpu-device-root.pem") in config
