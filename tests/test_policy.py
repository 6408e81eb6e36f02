"""Posture collection, GPU snapshots and the default policy, on the corpus's real nvidia-smi
captures and on simulated host trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtrust.agent.gpu.procfs import collect_procfs
from devtrust.agent.gpu.smi_xml import SmiXmlError, parse_smi_xml
from devtrust.agent.posture import collect_posture
from devtrust.core.tier import Tier
from devtrust.swtpm import EndorsementCA
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2
from devtrust.verifier.config import DEFAULT_POLICY
from devtrust.verifier.document import build
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.policy import Policy, PolicyError
from devtrust.verifier.trust import Claim, overall_tier
from devtrust.verifier.wire_body import plain
from tests.corpus import corpus_root

CORPUS = corpus_root()
POLICY = Policy.load(DEFAULT_POLICY)


def _gpu(name: str) -> attestation_pb2.GpuState:
    path = next((CORPUS / "gpu").rglob(name))
    return parse_smi_xml(path.read_bytes())


def _evaluate(
    tmp_path: Path,
    gpu: attestation_pb2.GpuState | None = None,
    zone: str = "",
) -> tuple[dict[Claim, int], list[tuple[str, str, str]]]:
    body = attestation_pb2.EvidenceBody(
        os=collect_posture(write_host_tree(tmp_path / "host")),
        gpu=gpu or attestation_pb2.GpuState(source="none"),
    )
    doc = build(plain(body), bulletins=POLICY.bulletins, zone=zone)
    out = POLICY.evaluate(doc, device_id="d1", zone=zone)
    return out.claims, [(f.id, f.subject, f.message) for f in out.findings]


def test_simulated_good_host_passes_the_default_policy(tmp_path: Path) -> None:
    claims, findings = _evaluate(tmp_path)
    assert findings == []
    assert overall_tier(claims) is Tier.AFFIRMING


def test_h100_capture_misses_two_security_bulletins(tmp_path: Path) -> None:
    gpu = _gpu("qx-h100.xml")
    assert gpu.driver_version == "580.105.08"
    assert len(gpu.gpus) == 8
    claims, findings = _evaluate(tmp_path, gpu)
    [bulletins] = [f for f in findings if f[0] == "gpu.driver.security_bulletins"]
    assert "found driver 580.105.08, bulletin 5747" in bulletins[2]  # the running one, first
    assert "bulletin 5747" in bulletins[2]
    assert "bulletin 5821" in bulletins[2]
    assert "fixed in 580.126.09" in bulletins[2]
    assert claims[Claim.CONFIGURATION] == 32  # warning
    assert claims[Claim.HARDWARE] == 2
    assert [f[0] for f in findings] == ["gpu.driver.security_bulletins"]


def test_lost_gpu_makes_hardware_contraindicated(tmp_path: Path) -> None:
    claims, findings = _evaluate(tmp_path, _gpu("qx-gb200-lost.xml"))
    assert claims[Claim.HARDWARE] == 96
    lost = [f for f in findings if f[0] == "gpu.lost"]
    assert [f[1] for f in lost] == ["gpu1:GPU-b200b200-0000-0000-0000-000000000001"]
    assert "GPU 1 (NVIDIA GB200, 0000:0B:00.0)" in lost[0][2]


def test_ecc_injected_finding_names_the_gpu(tmp_path: Path) -> None:
    _, findings = _evaluate(tmp_path, _gpu("qx-gb200-ecc-injected.xml"))
    [ecc] = [f for f in findings if f[0] == "gpu.ecc_uncorrected"]
    assert ecc[1].startswith("gpu0:")
    assert "GPU 0 (NVIDIA GB200, 0000:0A:00.0)" in ecc[2]
    assert ecc[2].endswith("found 5")


def test_fabric_degraded_finding_names_the_gpu(tmp_path: Path) -> None:
    _, findings = _evaluate(tmp_path, _gpu("qx-gb200-fabric-degraded.xml"))
    [fabric] = [f for f in findings if f[0] == "gpu.fabric"]
    assert fabric[1].startswith("gpu1:")
    assert "health summary Unhealthy" in fabric[2]


def test_a100_mig_capture_parses_its_mig_devices() -> None:
    gpu = _gpu("a100-sxm4-v12.xml")
    [a100] = gpu.gpus
    assert a100.mig_enabled is True
    assert [(m.gpu_instance_id, m.profile) for m in a100.mig_devices] == [
        (3, "14sm"),
        (4, "14sm"),
        (5, "14sm"),
        (6, "14sm"),
    ]
    reasons = {u.field: u.reason for u in a100.unavailable}
    assert reasons["remapped_rows_pending"] == "unknown"  # N/A while MIG instances are active


def test_production_inference_demands_confidential_computing(tmp_path: Path) -> None:
    gpu = attestation_pb2.GpuState(
        source="nvml",
        driver_version="580.159.03",
        gpus=[
            attestation_pb2.Gpu(
                index=0,
                name="H100",
                uuid="GPU-1",
                ecc_enabled=True,
                ecc_uncorrected_volatile=0,
                remapped_rows_pending=0,
                remapped_rows_failed=0,
                cc_state="off",
            )
        ],
    )
    claims, findings = _evaluate(tmp_path, gpu, zone="model-development")
    assert findings == []
    claims, findings = _evaluate(tmp_path, gpu, zone="production-inference")
    assert [f[0] for f in findings] == ["gpu.confidential_computing"]
    assert claims[Claim.RUNTIME_OPAQUE] == 96


@pytest.mark.parametrize(
    ("name", "change", "rule"),
    [
        (
            "secure boot off",
            (
                "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c",
                b"\x06\x00\x00\x00\x00",
            ),
            "os.secure_boot",
        ),
        (
            "root login",
            (
                "etc/ssh/sshd_config.d/10-hardening.conf",
                b"PermitRootLogin yes\nPasswordAuthentication no\n",
            ),
            "ssh.root_login",
        ),
        ("unexpected taint", ("proc/modules", b"rootkit 1 0 - Live 0x0 (OE)\n"), "os.kernel_taint"),
        ("lockdown none", ("sys/kernel/security/lockdown", b"[none] integrity\n"), "os.lockdown"),
    ],
)
def test_one_bad_signal_one_finding(
    tmp_path: Path, name: str, change: tuple[str, bytes], rule: str
) -> None:
    root = write_host_tree(tmp_path / "host")
    (root / change[0]).write_bytes(change[1])
    body = attestation_pb2.EvidenceBody(os=collect_posture(root))
    out = POLICY.evaluate(build(plain(body), bulletins=POLICY.bulletins), device_id="d1")
    assert [f.id for f in out.findings] == [rule], name


def test_missing_sources_are_unknown_not_off(tmp_path: Path) -> None:
    posture = collect_posture(tmp_path)  # an empty root: nothing readable
    assert not posture.HasField("secure_boot")
    assert not posture.HasField("ima_active")
    unknown = {u.field for u in posture.unavailable}
    assert {"secure_boot", "selinux_mode", "lockdown", "sshd", "modules"} <= unknown
    out = POLICY.evaluate(
        build(plain(attestation_pb2.EvidenceBody(os=posture)), bulletins=POLICY.bulletins),
        device_id="d1",
    )
    assert {f.id for f in out.findings} == {"policy.unknown"}
    assert all(f.severity.name == "WARNING" for f in out.findings)


def test_posture_of_the_simulated_host(tmp_path: Path) -> None:
    p = collect_posture(write_host_tree(tmp_path / "host"))
    assert (p.os_id, p.os_version, p.kernel_release) == ("ubuntu", "24.04", "6.8.0-49-generic")
    assert p.secure_boot is True
    assert p.setup_mode is False
    assert (p.lockdown, p.selinux_mode, p.apparmor_mode) == ("integrity", "enforcing", "disabled")
    assert [(m.mount_point, m.encrypted, m.cipher) for m in p.mounts] == [("/", True, "LUKS2")]
    assert [(s.address, s.port) for s in p.listening] == [("0.0.0.0", 22)]  # noqa: S104
    assert (p.sshd.permit_root_login, p.sshd.password_authentication) == ("no", False)
    assert [(m.name, m.taint) for m in p.modules][:2] == [("nvidia_uvm", "PO"), ("nvidia", "PO")]
    assert p.kernel_taint == 4097


def test_procfs_gpu_source(tmp_path: Path) -> None:
    base = tmp_path / "proc/driver/nvidia"
    (base / "gpus/0000:53:00.0").mkdir(parents=True)
    (base / "version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.105.08  Release Build\n"
    )
    (base / "gpus/0000:53:00.0/information").write_text(
        "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-1234\nVideo BIOS: \t 96.00.99.00.01\n"
        "Bus Location: \t 0000:53:00.0\nGPU Firmware: \t 580.105.08\n"
    )
    state = collect_procfs(tmp_path)
    assert state.driver_version == "580.105.08"
    [gpu] = state.gpus
    assert (gpu.name, gpu.uuid, gpu.gsp_firmware_version) == (
        "NVIDIA H100 80GB HBM3",
        "GPU-1234",
        "580.105.08",
    )


def test_garbage_gpu_xml_is_an_error() -> None:
    with pytest.raises(SmiXmlError, match="not nvidia-smi XML"):
        parse_smi_xml(b"<nvidia_smi_log><gpu>")
    with pytest.raises(SmiXmlError, match="root element <html>"):
        parse_smi_xml(b"<html/>")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("yaml", "rules: [\n", r"policy.yaml:2: not valid YAML"),
        (
            "cel",
            "rules:\n  - id: a\n    description: d\n    claim: hardware\n"
            "    severity: warning\n    expr: this.x >\n",
            r"policy.yaml:2: rule a: CEL",
        ),
        (
            "claim",
            "rules:\n  - id: a\n    description: d\n    claim: luck\n"
            "    severity: warning\n    expr: 'true'\n",
            "unknown claim 'luck'",
        ),
        (
            "severity",
            "rules:\n  - id: a\n    description: d\n    claim: hardware\n"
            "    severity: meh\n    expr: 'true'\n",
            "severity is warning or",
        ),
        (
            "key",
            "rules:\n  - id: a\n    description: d\n    claim: hardware\n"
            "    severity: warning\n    expr: 'true'\n    sevrity: x\n",
            "unknown rule key",
        ),
        (
            "duplicate",
            "rules:\n" + "  - {id: a, description: d, claim: hardware, "
            "severity: warning, expr: 'true'}\n" * 2,
            "duplicate rule id",
        ),
    ],
)
def test_bad_policy_names_file_line_and_reason(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_collect_then_policy_eval(tmp_path: Path) -> None:
    """The operator's dry run: `devtrust-agent collect --json` into `devtrust policy eval`."""
    import json
    import subprocess
    import sys

    root = write_host_tree(tmp_path / "host")
    xml = next((CORPUS / "gpu").rglob("qx-gb200-lost.xml"))
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtrust.agent.main",
            "collect",
            "--root",
            str(root),
            "--gpu-xml",
            str(xml),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    evidence = tmp_path / "evidence.json"
    evidence.write_text(collected.stdout)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtrust.verifier.cli",
            "policy",
            "eval",
            "--policy",
            str(DEFAULT_POLICY),
            "--evidence",
            str(evidence),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tier"] == "contraindicated"
    assert out["claims"]["hardware"] == 96
    assert [s["tier"] for s in out["submods"]] == ["warning", "contraindicated"]
    ids = {f["id"] for f in out["findings"]}
    assert {"gpu.lost", "gpu.driver.security_bulletins", "gpu.ecc_uncorrected"} <= ids
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtrust.verifier.cli",
            "policy",
            "eval",
            "--policy",
            str(DEFAULT_POLICY),
            "--evidence",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "not an EvidenceBody in JSON" in refused.stderr


def test_reload_policy_refuses_a_bad_file_and_keeps_the_old_one(
    tmp_path: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    import asyncio
    import shutil
    from dataclasses import replace

    import grpc

    from devtrust.v1 import query_pb2
    from tests.env import operator_stub, running, verifier_config

    policy_file = tmp_path / "policy.yaml"
    shutil.copy(DEFAULT_POLICY, policy_file)
    shutil.copy(DEFAULT_POLICY.parent / "nvidia-driver-bulletins.csv", tmp_path)
    config = replace(verifier_config(tmp_path, pki, endorsement_ca), policy=policy_file)

    async def scenario() -> tuple[grpc.aio.AioRpcError, str, str]:
        async with running(config) as verifier:
            channel, query = operator_stub(pki, verifier, tmp_path)
            async with channel:
                policy_file.write_text(
                    policy_file.read_text().replace(
                        "expr: os.secure_boot == true", "expr: os.secure_boot ==="
                    )
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await query.ReloadPolicy(query_pb2.ReloadPolicyRequest(), timeout=10)
                in_force = verifier.policy.current
                assert in_force is not None  # the verifier started with a policy file
                kept = in_force.policy_id
                policy_file.write_text(
                    policy_file.read_text()
                    .replace("expr: os.secure_boot ===", "expr: os.secure_boot == true")
                    .replace("devtrust-default-gpu-hosts-1", "fleet-2")
                )
                reloaded = await query.ReloadPolicy(query_pb2.ReloadPolicyRequest(), timeout=10)
            return refused.value, kept, reloaded.policy_id

    refused, kept, reloaded = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{policy_file}:" in (refused.details() or "")
    assert "rule os.secure_boot: CEL does not compile" in (refused.details() or "")
    assert kept == "devtrust-default-gpu-hosts-1"
    assert reloaded == "fleet-2"


def test_firewall_counts_nf_tables(tmp_path: Path) -> None:
    root = write_host_tree(tmp_path / "host")
    (root / "proc/net/ip_tables_names").write_text("")
    assert collect_posture(root).firewall_active is False
    (root / "proc/modules").write_text("nf_tables 1 0 - Live 0x0\n")
    assert collect_posture(root).firewall_active is True
    (root / "proc/net/ip_tables_names").unlink()
    assert not collect_posture(root).HasField("firewall_active")  # unknown, not off
