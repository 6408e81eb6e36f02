"""`devtrust gpu check` and `devtrust gpu rim add|list|remove` (issue 14, item 4): nvtrust's
recorded report, chain and RIMs verify end to end offline (exit 0); broken copies give their
named finding first (exit 1); unreadable or wrong inputs are one `devtrust: ` line (exit 2),
never a traceback. Run in-process through `devtrust.cli.main`, and once by subprocess."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from devtrust import cli
from devtrust.swtpm import corim_sim
from devtrust.swtpm.gpu_sim import SimGpu, SimGpuRoots
from devtrust.verifier.gpu import spdm
from tests.corpus import corpus_root

CORPUS = corpus_root() / "gpu" / "nvidia_nvtrust_attestation"
REPORT = CORPUS / "attestationReport-545.00.txt"
CHAIN = CORPUS / "gpuAkCertChain-545.00.txt"
HOPPER_REPORT = CORPUS / "hopperAttestationReport.txt"
HOPPER_CHAIN = CORPUS / "hopperCertChain.txt"
DRIVER_RIM = CORPUS / "Driver_RIM_test_no_gpu.swidtag"
VBIOS_RIM = CORPUS / "1010_0200_882_96005E0001_test_no_gpu.swidtag"
VBIOS_PROD_RIM = CORPUS / "1010_0200_882_96005E0001_PROD.swidtag"
# The RIM signers (HCC RIM L4 Signer) expire 2025-06-22/26: the recorded RIMs verify before.
AT = "2024-06-01T00:00:00+00:00"
REPORT_BYTES = bytes.fromhex(REPORT.read_text().strip())
NONCE = spdm.parse_report(REPORT_BYTES).request.nonce.hex()
RIMS = ["--rim", str(DRIVER_RIM), str(VBIOS_RIM)]
ROOT = Path(__file__).resolve().parent.parent


def _check(
    capsys: pytest.CaptureFixture[str],
    *extra: str,
    report: Path = REPORT,
    chain: Path = CHAIN,
) -> tuple[int, list[str], str]:
    """Exit status, stdout lines and stderr of `devtrust gpu check`."""
    argv = ["gpu", "check", "--report", str(report), "--chain", str(chain), *extra]
    status = cli.main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return status, out.out.splitlines(), out.err


def _json(
    capsys: pytest.CaptureFixture[str], *extra: str, **files: Path
) -> tuple[int, dict[str, Any]]:
    status, lines, _ = _check(capsys, *extra, "--json", **files)
    doc: dict[str, Any] = json.loads("\n".join(lines))
    return status, doc


# --- valid ---------------------------------------------------------------------------------


def test_recorded_report_with_both_rims_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    status, lines, err = _check(capsys, *RIMS, "--at", AT, "--nonce", NONCE)
    assert status == 0, lines
    assert lines[0] == "valid: the GPU report verifies"
    assert err == ""
    # Nothing above info: revocation is not checked without --revocation.
    assert [line.split(":")[0] for line in lines[1:-2]] == ["gpu.revocation.unknown"]
    assert lines[-2] == (
        "GPU: driver 545.00, VBIOS 96.00.5E.00.01, project 1010 SKU 0200, chip SKU 882"
    )
    leaf = x509.load_pem_x509_certificates(CHAIN.read_bytes())[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    identity = hashlib.sha256(spki).hexdigest()
    assert lines[-1] == f"identity: sha256 {identity} (the attestation key, SPKI)"


def test_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    status, doc = _json(capsys, *RIMS, "--at", AT, "--nonce", NONCE)
    assert status == 0
    assert doc["valid"] is True
    assert doc["nonce_checked"] is True
    assert doc["reason"] == "the GPU report verifies"
    assert doc["claims"] == {"hardware": 2, "configuration": 2, "executables": 2}
    assert {f["severity"] for f in doc["findings"]} == {"info"}
    assert set(doc["findings"][0]) == {
        "id", "severity", "claim", "subject", "message", "expected", "found",
    }  # fmt: skip
    gpu = doc["gpu"]
    assert gpu["driver"] == "545.00"
    assert gpu["vbios"] == "96.00.5E.00.01"
    assert (gpu["project"], gpu["project_sku"], gpu["chip_sku"]) == ("1010", "0200", "882")
    assert gpu["nonce"] == NONCE
    assert len(gpu["identity"]) == 64


def test_binary_report_is_the_hex_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    binary = tmp_path / "report.bin"
    binary.write_bytes(REPORT_BYTES)
    wrapped = tmp_path / "report.txt"  # hex with line breaks, as a mail or a terminal gives it
    text = REPORT_BYTES.hex()
    wrapped.write_text("\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + "\n")
    for report in (binary, wrapped):
        status, lines, _ = _check(capsys, *RIMS, "--at", AT, "--nonce", NONCE, report=report)
        assert status == 0, lines
        assert lines[0] == "valid: the GPU report verifies"


def test_without_nonce_the_output_says_it_was_not_checked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, lines, _ = _check(capsys, *RIMS, "--at", AT)
    assert status == 0
    assert lines[0] == "valid: the GPU report verifies (nonce not checked: no --nonce)"
    status, doc = _json(capsys, *RIMS, "--at", AT)
    assert doc["nonce_checked"] is False


# --- invalid: the named finding first ---------------------------------------------------------


def _write_report(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "broken.txt"
    path.write_text(data.hex())
    return path


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# The first measurement block's value: request (37 bytes), response header (8), then Index,
# Spec, Size (2), Type, ValueSize (2).
FIRST_VALUE = 37 + 8 + 7


@pytest.mark.parametrize(
    ("name", "offset"),
    [("measurement byte", FIRST_VALUE), ("signature byte", len(REPORT_BYTES) - 10)],
)
def test_one_changed_byte_is_an_invalid_signature(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, offset: int
) -> None:
    broken = _write_report(tmp_path, _flip(REPORT_BYTES, offset))
    status, lines, _ = _check(capsys, *RIMS, "--at", AT, "--nonce", NONCE, report=broken)
    assert status == 1
    assert lines[0].startswith("gpu.report.signature_invalid: GPU 0 (broken.txt)"), lines


def test_nonce_of_another_challenge(capsys: pytest.CaptureFixture[str]) -> None:
    other = "00" * 32
    status, lines, _ = _check(capsys, *RIMS, "--at", AT, "--nonce", other)
    assert status == 1
    assert lines[0].startswith("gpu.report.nonce_mismatch: "), lines
    assert NONCE in lines[0]
    assert other in lines[0]
    status, doc = _json(capsys, *RIMS, "--at", AT, "--nonce", other)
    assert doc["valid"] is False
    assert doc["reason"].startswith("gpu.report.nonce_mismatch: ")
    assert doc["findings"][0]["found"] == NONCE
    assert doc["claims"] == {"instance-identity": 99}


def test_leaf_of_another_gpu_is_an_invalid_signature(capsys: pytest.CaptureFixture[str]) -> None:
    """The Hopper sample's chain (NVIDIA's root too) with the 545 report."""
    status, lines, _ = _check(capsys, *RIMS, "--at", AT, chain=HOPPER_CHAIN)
    assert status == 1
    assert lines[0].startswith("gpu.report.signature_invalid: "), lines


def test_chain_to_another_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = _test_ca(tmp_path).root
    status, lines, _ = _check(capsys, *RIMS, "--at", AT, "--root", str(root))
    assert status == 1
    assert lines[0].startswith("gpu.certificate.chain_invalid: "), lines
    assert "devtrust test GPU root" in lines[0]


def test_rim_for_another_vbios_and_driver(capsys: pytest.CaptureFixture[str]) -> None:
    """The Hopper sample (driver 550.90.07, VBIOS 96.00.9F.00.01) against 545.00's RIMs."""
    status, lines, _ = _check(capsys, *RIMS, "--at", AT, report=HOPPER_REPORT, chain=HOPPER_CHAIN)
    assert status == 1
    ids = [line.split(":")[0] for line in lines]
    assert ids[:2] == ["gpu.rim.version_mismatch", "gpu.rim.version_mismatch"], lines
    assert "96.00.9F.00.01" in lines[1]
    assert "96.00.5E.00.01" in lines[1]


def test_prod_vbios_rim_differs_from_the_test_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The production RIM of the same VBIOS differs in four indices: each named."""
    status, lines, _ = _check(capsys, "--rim", str(DRIVER_RIM), str(VBIOS_PROD_RIM), "--at", AT)
    assert status == 1
    mismatches = [line for line in lines if line.startswith("gpu.measurement.mismatch: ")]
    assert lines[0] == mismatches[0]
    assert len(mismatches) == 4
    assert all("VBIOS RIM" in line for line in mismatches)


def test_changed_measurement_resigned_names_the_index(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A report whose signature verifies (re-signed by a test GPU key, its root given as
    --root) but whose measurement differs from the RIM: the mismatch names the index."""
    ca = _test_ca(tmp_path)
    root, key, leaf = ca.root, ca.key, ca.leaf
    report = spdm.parse_report(REPORT_BYTES)
    block = report.response.blocks[1]  # block 2, RIM index 1: in the VBIOS RIM
    assert block.value in REPORT_BYTES
    start = REPORT_BYTES.index(block.value)
    changed = _flip(REPORT_BYTES, start)[: -spdm.SIGNATURE_SIZE]
    r, s = decode_dss_signature(key.sign(changed, ec.ECDSA(hashes.SHA384())))
    resigned = _write_report(tmp_path, changed + r.to_bytes(48, "big") + s.to_bytes(48, "big"))
    status, lines, _ = _check(
        capsys, *RIMS, "--at", AT, "--root", str(root), report=resigned, chain=leaf
    )
    assert status == 1
    assert lines[0].startswith("gpu.measurement.mismatch: "), lines
    assert "block 2 (RIM index 1)" in lines[0]
    assert block.value.hex() in lines[0]
    assert _flip(block.value, 0).hex() in lines[0]


def test_rims_past_their_signers_validity_are_invalid(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Now (no --at): NVIDIA's test RIM signers expired in 2025; each RIM is named, the
    reason says --at, and the measurements are not compared."""
    status, lines, _ = _check(capsys, *RIMS, "--nonce", NONCE)
    assert status == 1
    ids = [line.split(":")[0] for line in lines]
    assert ids[:4] == ["gpu.rim.invalid"] * 2 + ["gpu.rim.missing"] * 2, lines
    assert str(DRIVER_RIM) in lines[0]
    assert "expired" in lines[0]
    assert "--at" in lines[0]


def test_tampered_rim_is_invalid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = VBIOS_RIM.read_text()
    first = text.index("Hash0=") + len('Hash0="')
    tampered = tmp_path / "tampered.swidtag"
    digit = "0" if text[first] != "0" else "1"
    tampered.write_text(text[:first] + digit + text[first + 1 :])
    status, lines, _ = _check(capsys, "--rim", str(DRIVER_RIM), str(tampered), "--at", AT)
    assert status == 1
    assert lines[0].startswith("gpu.rim.invalid: "), lines
    assert "tampered.swidtag" in lines[0]


def test_rims_of_another_root_are_invalid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--rim-root replaces NVIDIA's RIM root: NVIDIA's RIMs then do not verify."""
    root = _test_ca(tmp_path).root
    status, lines, _ = _check(capsys, *RIMS, "--at", AT, "--rim-root", str(root))
    assert status == 1
    assert [line.split(":")[0] for line in lines[:2]] == ["gpu.rim.invalid"] * 2, lines


def test_without_rims_the_measurements_are_not_compared(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, lines, _ = _check(capsys, "--at", AT, "--nonce", NONCE)
    assert status == 1
    assert [line.split(":")[0] for line in lines[:2]] == ["gpu.rim.missing"] * 2


def test_revoked_leaf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--revocation: a CRL by the test root revoking the test GPU's certificate."""
    ca = _test_ca(tmp_path, sign_report=True)
    root, leaf = ca.root, ca.leaf
    crls = tmp_path / "crls"
    crls.mkdir()
    cert = x509.load_pem_x509_certificate(leaf.read_bytes())
    issuer = x509.load_pem_x509_certificate(root.read_bytes())
    when = datetime.datetime(2024, 5, 30, tzinfo=datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(when)
        .next_update(when + datetime.timedelta(days=30))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(when)
            .build()
        )
        .sign(ca.root_key, hashes.SHA384())
    )
    (crls / "root.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    resigned = tmp_path / "resigned.txt"
    argv = ["--at", AT, "--root", str(root), "--revocation", str(crls), *RIMS]
    status, lines, _ = _check(capsys, *argv, report=resigned, chain=leaf)
    assert status == 1
    assert lines[0].startswith("gpu.certificate.revoked: "), lines


# --- a simulated GPU (swtpm/gpu_sim.py: test roots standing in for NVIDIA's) -----------------


SIM_NONCE = bytes(range(32))


def _simulated(tmp_path: Path, roots: SimGpuRoots, gpu: SimGpu, name: str) -> list[str]:
    """`gpu check` options for a simulated GPU's report (for SIM_NONCE), its chain and the
    RIMs of its versions, files named ``name``-*; the roots are not among them."""
    (tmp_path / f"{name}-report.txt").write_text(gpu.report(SIM_NONCE).hex())
    chain = b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        for der in gpu.certificates()
    )
    (tmp_path / f"{name}-chain.pem").write_bytes(chain)
    (tmp_path / f"{name}-driver.swidtag").write_bytes(roots.rim("driver", gpu.driver_version))
    (tmp_path / f"{name}-vbios.swidtag").write_bytes(roots.rim("vbios", gpu.vbios_version))
    return [
        *("--report", str(tmp_path / f"{name}-report.txt")),
        *("--chain", str(tmp_path / f"{name}-chain.pem")),
        *(
            "--rim",
            str(tmp_path / f"{name}-driver.swidtag"),
            str(tmp_path / f"{name}-vbios.swidtag"),
        ),
        *("--nonce", SIM_NONCE.hex()),
    ]


def test_simulated_gpu_is_valid_and_its_faults_are_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """swtpm/gpu_sim.py's GPU, with the simulation's roots given: valid; with the shipped
    (NVIDIA's) roots: not trusted; its faults: each named first."""
    roots = SimGpuRoots.create(tmp_path / "roots")
    gpu = SimGpu.create(roots, 0)
    argv = _simulated(tmp_path, roots, gpu, "good")
    trust = ["--root", str(roots.device_root_path), "--rim-root", str(roots.rim_root_path)]

    def check(*more: str) -> tuple[int, list[str]]:
        status = cli.main(["gpu", "check", *more])
        return status, capsys.readouterr().out.splitlines()

    status, lines = check(*argv, *trust)
    assert status == 0, lines
    assert lines[0] == "valid: the GPU report verifies"
    status, lines = check(*argv)
    assert status == 1
    ids = [line.split(":")[0] for line in lines]
    assert ids[:3] == ["gpu.certificate.chain_invalid", "gpu.rim.invalid", "gpu.rim.invalid"]
    # A measurement that differs from its RIM, in a report the GPU signed.
    status, lines = check(*_simulated(tmp_path, roots, gpu.tampered(block=2), "bad"), *trust)
    assert status == 1
    assert lines[0].startswith("gpu.measurement.mismatch: "), lines
    assert "block 2 (RIM index 1)" in lines[0]
    # Revoked: the simulation's CRLs naming its leaf.
    roots.write_revocation(tmp_path / "crls", [gpu.leaf])
    status, lines = check(*argv, *trust, "--revocation", str(tmp_path / "crls"))
    assert status == 1
    assert lines[0].startswith("gpu.certificate.revoked: "), lines


def test_simulated_gpu_with_corims(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Reference values as signed CoRIMs (swtpm/corim_sim.py, in NVIDIA's shape): accepted
    by --rim beside or instead of SWID tags; one that carries no signer certificate needs
    --signer; a changed value is a mismatch; one of another signer is gpu.rim.invalid."""
    roots = SimGpuRoots.create(tmp_path / "roots")
    gpu = SimGpu.create(roots, 0)
    argv = _simulated(tmp_path, roots, gpu, "good")
    argv = argv[: argv.index("--rim")] + argv[argv.index("--nonce") :]  # no SWID tags
    trust = ["--root", str(roots.device_root_path), "--rim-root", str(roots.rim_root_path)]
    driver, vbios = tmp_path / "driver.corim", tmp_path / "vbios.corim"
    driver.write_bytes(corim_sim.corim(roots, "driver", gpu.driver_version))
    vbios.write_bytes(corim_sim.corim(roots, "vbios", gpu.vbios_version, x5chain=False))
    signer = tmp_path / "rim-signer.pem"
    signer.write_bytes(roots.rim_signer.public_bytes(serialization.Encoding.PEM))

    def check(*more: str) -> tuple[int, list[str]]:
        status = cli.main(["gpu", "check", *argv, *trust, *more])
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err
        return status, out.out.splitlines()

    status, lines = check("--rim", str(driver), str(vbios), "--signer", str(signer))
    assert status == 0, lines
    # Without --signer the VBIOS CoRIM (no x5chain) does not verify, and says what to give.
    status, lines = check("--rim", str(driver), str(vbios))
    assert status == 1
    assert lines[0].startswith("gpu.rim.invalid: "), lines
    assert "vbios.corim" in lines[0]
    assert "--signer FILE" in lines[0]
    # A CoRIM whose value at block 2 (RIM index 1) is not the GPU's.
    values = dict(corim_sim.spdm_values("vbios", gpu.vbios_version))
    values[2] = (bytes(48),)
    vbios.write_bytes(corim_sim.corim(roots, "vbios", gpu.vbios_version, values=values))
    status, lines = check("--rim", str(driver), str(vbios))
    assert status == 1
    assert lines[0].startswith("gpu.measurement.mismatch: "), lines
    assert "block 2 (RIM index 1)" in lines[0]
    # Signed by another simulation's RIM signer (the VBIOS CoRIM good again).
    vbios.write_bytes(corim_sim.corim(roots, "vbios", gpu.vbios_version))
    other = SimGpuRoots.create(tmp_path / "other")
    driver.write_bytes(corim_sim.corim(other, "driver", gpu.driver_version))
    status, lines = check("--rim", str(driver), str(vbios))
    assert status == 1
    assert lines[0].startswith("gpu.rim.invalid: "), lines
    assert "driver.corim" in lines[0]
    # The RIM store takes CoRIMs too; one that carries no certificate needs --signer.
    store = ["--store", str(tmp_path / "rims"), "--root", str(roots.rim_root_path)]
    status, lines, _ = _rim(capsys, "add", str(vbios), *store)
    assert status == 0, lines
    assert lines[0].startswith(f"added vbios RIM {gpu.vbios_version} (GH100, 12 active"), lines
    driver.write_bytes(corim_sim.corim(roots, "driver", gpu.driver_version, x5chain=False))
    status, lines, _ = _rim(capsys, "add", str(driver), *store)
    assert status == 1
    assert lines[0].startswith("gpu.rim.invalid: "), lines
    assert "--signer" in lines[0]
    status, lines, _ = _rim(capsys, "add", str(driver), *store, "--signer", str(signer))
    assert status == 0, lines
    status, lines, _ = _rim(capsys, "list", *store[:2])
    assert status == 0
    assert len(lines) == 2, lines


# --- usage: exit 2, one line -------------------------------------------------------------------


def _usage(capsys: pytest.CaptureFixture[str], *extra: str, **files: Path) -> str:
    status, lines, err = _check(capsys, *extra, **files)
    assert status == 2, (lines, err)
    assert lines == []
    [line] = err.splitlines()
    assert line.startswith("devtrust: "), line
    return line


def test_unreadable_and_empty_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nothing.txt"
    assert _usage(capsys, report=missing) == (
        f"devtrust: cannot read --report {missing}: No such file or directory"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert _usage(capsys, report=empty) == f"devtrust: --report {empty} is empty"
    assert _usage(capsys, chain=missing).startswith(f"devtrust: cannot read --chain {missing}")
    assert _usage(capsys, "--rim", str(missing)).startswith(
        f"devtrust: cannot read --rim {missing}"
    )
    assert _usage(capsys, "--root", str(missing)).startswith(
        f"devtrust: cannot read --root {missing}"
    )


def test_swapped_files_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert "found PEM: give the certificate chain as --chain" in _usage(
        capsys, report=CHAIN, chain=CHAIN
    )
    assert "found XML: give RIMs as --rim" in _usage(capsys, report=DRIVER_RIM)
    assert "expected PEM certificates" in _usage(capsys, chain=REPORT)
    assert (
        "expected a RIM, a SWID tag (XML) or a signed CoRIM (CBOR tag 502), found b'-----BEGIN"
        in _usage(capsys, "--rim", str(CHAIN))
    )
    assert "expected PEM certificates" in _usage(capsys, "--root", str(REPORT))


def test_reports_that_are_not_reports(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    odd = tmp_path / "odd.txt"
    odd.write_text("abc")
    assert _usage(capsys, report=odd) == (
        f"devtrust: --report {odd}: expected an even number of hex digits, found 3"
    )
    words = tmp_path / "words.txt"
    words.write_text("not a report at all\n")
    assert "found text starting 6e6f" in _usage(capsys, report=words)
    key = tmp_path / "key.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert "found PEM blocks PRIVATE KEY" in _usage(capsys, chain=key)


def test_report_that_starts_as_one_but_does_not_parse(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Bytes of a report cut short: the appraisal's finding, exit 1, naming the field."""
    cut = _write_report(tmp_path, REPORT_BYTES[:100])
    status, lines, _ = _check(capsys, "--at", AT, report=cut)
    assert status == 1
    assert lines[0].startswith("gpu.report.malformed: "), lines
    assert "response MeasurementRecord" in lines[0]


@pytest.mark.parametrize(
    ("nonce", "says"),
    [
        ("xyz", "--nonce: expected 64 hex digits, found 'xyz' (not hex)"),
        (
            "00" * 16,
            "--nonce: expected 64 hex digits (32 bytes, the nonce the GPU signed), found 32",
        ),
    ],
)
def test_bad_nonce(capsys: pytest.CaptureFixture[str], nonce: str, says: str) -> None:
    assert _usage(capsys, "--nonce", nonce) == f"devtrust: {says}"


def test_bad_time_and_missing_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["gpu", "check", "--report", str(REPORT), "--chain", str(CHAIN), "--at", "soon"])
    assert exited.value.code == 2
    assert "'soon' is not a time" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["gpu", "check", "--report", str(REPORT)])
    assert exited.value.code == 2
    assert "--chain" in capsys.readouterr().err


def test_revocation_must_be_a_directory_of_crls(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert "expected a directory of CRLs and OCSP responses, found a file" in _usage(
        capsys, "--revocation", str(REPORT)
    )
    junk = tmp_path / "crls"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    line = _usage(capsys, "--revocation", str(junk))
    assert line.startswith(f"devtrust: --revocation {junk}: "), line
    assert "notes.txt" in line


# --- the exit statuses as a shell sees them --------------------------------------------------


def test_exit_statuses_by_subprocess(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devtrust.cli", "gpu", "check", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )

    files = ["--report", str(REPORT), "--chain", str(CHAIN)]
    valid = run(*files, *RIMS, "--at", AT, "--nonce", NONCE)
    assert (valid.returncode, valid.stderr) == (0, "")
    assert valid.stdout.startswith("valid: the GPU report verifies\n")
    invalid = run(*files, *RIMS, "--at", AT, "--nonce", "11" * 32)
    assert invalid.returncode == 1
    assert invalid.stdout.startswith("gpu.report.nonce_mismatch: ")
    usage = run("--report", str(tmp_path / "none"), "--chain", str(CHAIN))
    assert usage.returncode == 2
    assert usage.stdout == ""
    assert usage.stderr.startswith("devtrust: cannot read --report ")
    for done in (valid, invalid, usage):
        assert "Traceback" not in done.stdout + done.stderr


# --- gpu rim add | list | remove ---------------------------------------------------------------


def _rim(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    status = cli.main(["gpu", "rim", *argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return status, out.out.splitlines(), out.err


def test_rim_store_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "rims")]
    status, lines, _ = _rim(capsys, "add", str(DRIVER_RIM), str(VBIOS_RIM), *store, "--at", AT)
    assert status == 0, lines
    assert lines[0].startswith("added driver RIM 545.00 (GH100, 21 active measurements")
    assert lines[1].startswith("added vbios RIM 96.00.5E.00.01 (GH100, 12 active measurements")
    status, lines, _ = _rim(capsys, "list", *store)
    assert status == 0
    assert [line.split()[:2] for line in lines] == [
        ["driver", "545.00"],
        ["vbios", "96.00.5E.00.01"],
    ]
    status, lines, _ = _rim(capsys, "list", *store, "--json")
    doc = json.loads("\n".join(lines))
    assert doc["problems"] == []
    assert [(r["kind"], r["version"], r["measurements"]) for r in doc["rims"]] == [
        ("driver", "545.00", 21),
        ("vbios", "96.00.5E.00.01", 12),
    ]
    assert doc["rims"][0]["sha256"] == hashlib.sha256(DRIVER_RIM.read_bytes()).hexdigest()
    status, lines, _ = _rim(capsys, "remove", "vbios", "96.00.5e.00.01", *store)
    assert status == 0
    assert lines == [f"removed the vbios RIM 96.00.5E.00.01 from {tmp_path / 'rims'}"]
    status, lines, err = _rim(capsys, "remove", "vbios", "96.00.5E.00.01", *store)
    assert status == 1
    assert err.startswith("devtrust: RIM store ")
    assert "found driver 545.00" in err


def test_rim_add_refuses_expired_and_tampered(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = ["--store", str(tmp_path / "rims")]
    status, lines, _ = _rim(capsys, "add", str(DRIVER_RIM), *store)  # now: signer expired
    assert status == 1
    assert lines[0].startswith("gpu.rim.invalid: "), lines
    assert "--at" in lines[0]
    status, lines, err = _rim(capsys, "add", str(CHAIN), *store)
    assert status == 2
    assert err.startswith(
        f"devtrust: RIM file {CHAIN}: expected a RIM, a SWID tag (XML) or a signed CoRIM "
        "(CBOR tag 502), found"
    )
    status, lines, _ = _rim(capsys, "list", *store)
    assert (status, lines) == (0, [f"no RIMs in {tmp_path / 'rims'}: add them with "
                                   "`devtrust gpu rim add FILE`"])  # fmt: skip


def test_rim_list_names_a_changed_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    directory = tmp_path / "rims"
    assert _rim(capsys, "add", str(DRIVER_RIM), "--store", str(directory), "--at", AT)[0] == 0
    [stored] = directory.glob("*.swidtag")
    stored.write_bytes(stored.read_bytes() + b" ")
    status, lines, _ = _rim(capsys, "list", "--store", str(directory))
    assert status == 1
    assert lines[-1].startswith("gpu.rim.invalid: "), lines
    assert stored.name in lines[-1]


def test_rim_store_from_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "verifier.yaml"
    config.write_text(f"gpu:\n  rim_store: {tmp_path / 'from-config'}\n")
    assert _rim(capsys, "add", str(VBIOS_RIM), "--config", str(config), "--at", AT)[0] == 0
    status, lines, _ = _rim(capsys, "list", "--store", str(tmp_path / "from-config"))
    assert status == 0
    assert lines[0].split()[:2] == ["vbios", "96.00.5E.00.01"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu: [\n")
    status, lines, err = _rim(capsys, "list", "--config", str(bad))
    assert status == 2
    assert err.startswith(f"devtrust: --config {bad}: ")


def test_rim_add_with_another_root_refuses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = _test_ca(tmp_path).root
    status, lines, _ = _rim(
        capsys,
        "add",
        str(DRIVER_RIM),
        "--store",
        str(tmp_path / "r"),
        "--at",
        AT,
        "--root",
        str(root),
    )
    assert status == 1
    assert lines[0].startswith("gpu.rim.invalid: "), lines


# --- a test GPU identity CA ------------------------------------------------------------------


@dataclass(frozen=True)
class GpuCa:
    root: Path  # PEM
    root_key: ec.EllipticCurvePrivateKey
    key: ec.EllipticCurvePrivateKey  # the test GPU's attestation key
    leaf: Path  # PEM: its certificate, issued by the root


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _test_ca(tmp_path: Path, *, sign_report: bool = False) -> GpuCa:
    """A test root (PEM file), a GPU attestation key and its leaf certificate (PEM file)
    issued by that root; with ``sign_report`` also the 545 report re-signed by that key as
    resigned.txt."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    key = ec.generate_private_key(ec.SECP384R1())
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    end = datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("devtrust test GPU root"))
        .issuer_name(_name("devtrust test GPU root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA384())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("devtrust test GPU"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("gpu.test")]), False)
        .sign(root_key, hashes.SHA384())
    )
    root_path, leaf_path = tmp_path / "test-root.pem", tmp_path / "test-leaf.pem"
    root_path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    if sign_report:
        transcript = REPORT_BYTES[: -spdm.SIGNATURE_SIZE]
        r, s = decode_dss_signature(key.sign(transcript, ec.ECDSA(hashes.SHA384())))
        signed = transcript + r.to_bytes(48, "big") + s.to_bytes(48, "big")
        (tmp_path / "resigned.txt").write_text(signed.hex())
    return GpuCa(root_path, root_key, key, leaf_path)
