"""Required evidence per zone (issue 7, item 5): GPU rules must not pass vacuously over GPU
state that was never sent, and the zone that selects what is required is the verifier's record
of the device, never the host's claim. Also: policy cost is linear in the GPU count (item 7)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cel
import pytest

from devtrust.agent.posture import collect_posture
from devtrust.core.tier import Tier
from devtrust.swtpm.hosttree import write_host_tree
from devtrust.v1 import attestation_pb2, common_pb2
from devtrust.verifier.config import DEFAULT_POLICY
from devtrust.verifier.document import Document, build
from devtrust.verifier.policy import Policy, PolicyError, PolicyOutcome
from devtrust.verifier.trust import Claim, Severity, overall_tier
from devtrust.verifier.wire_body import plain

POLICY = Policy.load(DEFAULT_POLICY)


def _gpu(index: int = 0, *, ecc: bool = True) -> attestation_pb2.Gpu:
    return attestation_pb2.Gpu(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index:04d}",
        pci_bus_id=f"0000:{index:02X}:00.0",
        ecc_enabled=ecc,
        ecc_uncorrected_volatile=0,
        remapped_rows_pending=0,
        remapped_rows_failed=0,
        cc_state="on",
    )


def _outcome(
    body: attestation_pb2.EvidenceBody, zone: str, policy: Policy = POLICY
) -> PolicyOutcome:
    doc = build(plain(body), bulletins=policy.bulletins, zone=zone)
    return policy.evaluate(doc, device_id="d1", zone=zone)


@pytest.fixture
def posture(tmp_path: Path) -> attestation_pb2.OsPosture:
    return collect_posture(write_host_tree(tmp_path / "host"))


def _missing(out: PolicyOutcome) -> list[tuple[Claim, str, str]]:
    return [
        (f.claim, f.subject, f.message) for f in out.findings if f.id == "policy.evidence_missing"
    ]


@pytest.mark.parametrize("zone", ["production-inference", "model-development"])
def test_gpu_zone_without_gpu_state_is_contraindicated(
    posture: attestation_pb2.OsPosture, zone: str
) -> None:
    out = _outcome(attestation_pb2.EvidenceBody(os=posture), zone)
    assert _missing(out) == [
        (
            Claim.HARDWARE,
            "gpu",
            f"device d1 in zone '{zone}': the policy requires GPU state listing at least one "
            "GPU; the evidence has no GPU state",
        )
    ]
    [finding] = [f for f in out.findings if f.id == "policy.evidence_missing"]
    assert finding.severity is Severity.CONTRAINDICATED
    assert out.claims[Claim.HARDWARE] == 96
    assert overall_tier(out.claims) is Tier.CONTRAINDICATED


def test_gpu_state_listing_no_gpu_is_contraindicated(posture: attestation_pb2.OsPosture) -> None:
    """GPU state sent but empty (the agent's `source: none`) is no GPU evidence either."""
    body = attestation_pb2.EvidenceBody(os=posture, gpu=attestation_pb2.GpuState(source="none"))
    out = _outcome(body, "production-inference")
    assert [(c, s) for c, s, _ in _missing(out)] == [(Claim.HARDWARE, "gpu")]
    assert _missing(out)[0][2].endswith("the evidence has GPU state listing no GPU")
    assert overall_tier(out.claims) is Tier.CONTRAINDICATED


def test_gpu_zone_with_a_gpu_is_affirming(posture: attestation_pb2.OsPosture) -> None:
    gpu = attestation_pb2.GpuState(source="nvml", driver_version="580.159.03", gpus=[_gpu()])
    out = _outcome(attestation_pb2.EvidenceBody(os=posture, gpu=gpu), "production-inference")
    assert out.findings == ()
    assert overall_tier(out.claims) is Tier.AFFIRMING


@pytest.mark.parametrize("zone", ["management", "data-processing", ""])
def test_other_zones_need_no_gpu_state(posture: attestation_pb2.OsPosture, zone: str) -> None:
    out = _outcome(attestation_pb2.EvidenceBody(os=posture), zone)
    assert out.findings == ()
    assert overall_tier(out.claims) is Tier.AFFIRMING


@pytest.mark.parametrize("zone", ["management", "production-inference"])
def test_body_without_os_posture_is_contraindicated(zone: str) -> None:
    gpu = attestation_pb2.GpuState(source="nvml", driver_version="580.159.03", gpus=[_gpu()])
    out = _outcome(attestation_pb2.EvidenceBody(gpu=gpu), zone)
    assert _missing(out) == [
        (
            Claim.CONFIGURATION,
            "os",
            f"device d1 in zone '{zone}': the policy requires OS posture; the evidence has no "
            "OS posture",
        )
    ]
    assert out.claims[Claim.CONFIGURATION] == 96
    assert overall_tier(out.claims) is Tier.CONTRAINDICATED


def test_empty_body_misses_both(posture: attestation_pb2.OsPosture) -> None:
    out = _outcome(attestation_pb2.EvidenceBody(), "model-development")
    assert [s for _, s, _ in _missing(out)] == ["os", "gpu"]
    assert out.claims[Claim.HARDWARE] == 96
    assert out.claims[Claim.CONFIGURATION] == 96


def test_a_document_not_built_from_a_body_sent_nothing() -> None:
    """A document without the `sent` record (not made by document.build) fails closed."""
    doc: Document = {"host": {}, "os": {"secure_boot": True}, "gpu": {"gpus": [plain(_gpu())]}}
    out = POLICY.evaluate(doc, device_id="d1", zone="production-inference")
    assert [s for _, s, _ in _missing(out)] == ["os", "gpu"]


def test_zone_is_the_verifiers_record_not_the_hosts_claim(
    posture: attestation_pb2.OsPosture,
) -> None:
    """A host in production-inference that says it is in management, without GPU state, is
    still judged by production-inference; and no rule can read the host's claimed zone."""
    host = common_pb2.HostFacts(hostname="h", zone="management", labels={"tier": "gold"})
    body = attestation_pb2.EvidenceBody(host=host, os=posture)
    out = _outcome(body, "production-inference")
    assert [s for _, s, _ in _missing(out)] == ["gpu"]
    doc = build(plain(body), bulletins=POLICY.bulletins, zone="production-inference")
    assert "zone" not in doc["host"]
    assert "labels" not in doc["host"]
    assert doc["host"]["hostname"] == "h"
    assert doc["device"] == {"zone": "production-inference", "labels": {}}
    # A rule on the host's claim is refused when the policy loads.
    with pytest.raises(PolicyError, match=r"p\.yaml:3: rule zone\.claimed: host\.zone is not in"):
        Policy.parse(
            "required_evidence: []\nrules:\n  - id: zone.claimed\n    description: d\n"
            "    claim: configuration\n    severity: contraindicated\n"
            "    expr: host.zone == 'management'\n",
            source="p.yaml",
            base=Path(),
        )


def test_required_evidence_selects_by_labels(posture: attestation_pb2.OsPosture) -> None:
    policy = Policy.parse(
        "required_evidence:\n  - evidence: gpu\n    labels: {accelerated: 'yes'}\n"
        "rules:\n  - {id: a, description: d, claim: hardware, severity: warning, expr: 'true'}\n",
        source="p.yaml",
        base=Path(),
    )
    body = plain(attestation_pb2.EvidenceBody(os=posture))
    doc = build(body, bulletins=policy.bulletins)
    assert policy.evaluate(doc, device_id="d1", labels={"accelerated": "no"}).findings == ()
    [finding] = policy.evaluate(doc, device_id="d1", labels={"accelerated": "yes"}).findings
    assert (finding.id, finding.subject) == ("policy.evidence_missing", "gpu")


def test_gpu_attestation_is_required_per_zone_and_checked_by_the_gpu_appraisal(
    posture: attestation_pb2.OsPosture,
) -> None:
    """``gpu_attestation`` selects zones and labels like any required evidence; whether each
    GPU's report verified is the GPU appraisal's to say (verifier/gpu/appraise.py), so the
    document's `sent` is not asked and the policy reports nothing missing for it."""
    policy = Policy.parse(
        "required_evidence:\n  - evidence: gpu_attestation\n    zones: [production-inference]\n"
        "    labels: {cc: 'on'}\n"
        "rules:\n  - {id: a, description: d, claim: hardware, severity: warning, expr: 'true'}\n",
        source="p.yaml",
        base=Path(),
    )
    assert policy.requires("gpu_attestation", "production-inference", {"cc": "on"})
    assert not policy.requires("gpu_attestation", "production-inference", {"cc": "off"})
    assert not policy.requires("gpu_attestation", "batch", {"cc": "on"})
    assert not policy.requires("gpu", "production-inference", {"cc": "on"})
    doc = build(plain(attestation_pb2.EvidenceBody(os=posture)), bulletins=policy.bulletins)
    outcome = policy.evaluate(doc, device_id="d1", zone="production-inference", labels={"cc": "on"})
    assert outcome.findings == ()


_RULES = "rules:\n  - {id: a, description: d, claim: hardware, severity: warning, expr: 'true'}\n"


@pytest.mark.parametrize(
    ("name", "section", "message"),
    [
        (
            "unknown evidence",
            "required_evidence:\n  - evidence: os\n  - evidence: tpm\n",
            r"p\.yaml:3: required_evidence: evidence is one of os, gpu, gpu_attestation, got 'tpm'",
        ),
        (
            "missing evidence",
            "required_evidence:\n  - zones: [management]\n",
            r"p\.yaml:2: required_evidence: evidence is one of os, gpu, gpu_attestation, got None",
        ),
        (
            "unknown key",
            "required_evidence:\n  - evidence: gpu\n    zone: [management]\n",
            r"p\.yaml:2: unknown required_evidence key\(s\) zone",
        ),
        (
            "zones not a list",
            "required_evidence:\n  - evidence: gpu\n  - evidence: os\n    zones: management\n",
            r"p\.yaml:3: required_evidence os: zones is a list",
        ),
        (
            "labels not a mapping",
            "required_evidence:\n  - evidence: gpu\n    labels: [a]\n",
            r"p\.yaml:2: required_evidence gpu: zones is a list of zone names, labels a mapping",
        ),
        ("entry not a mapping", "required_evidence:\n  - gpu\n", r"p\.yaml:2: a required_ev"),
        ("not a list", "required_evidence: gpu\n", r"p\.yaml:1: required_evidence must be a list"),
    ],
)
def test_bad_required_evidence_names_file_and_line(
    tmp_path: Path, name: str, section: str, message: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(section + _RULES)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_default_policy_requires_os_everywhere_and_gpus_on_gpu_zones() -> None:
    assert [(r.evidence, r.zones) for r in POLICY.required] == [
        ("os", ()),
        ("gpu", ("model-development", "production-inference")),
    ]


def _many_gpus(count: int, posture: attestation_pb2.OsPosture) -> dict[str, object]:
    gpus = [_gpu(i, ecc=i % 2 == 0) for i in range(count)]
    state = attestation_pb2.GpuState(source="nvml", driver_version="580.159.03", gpus=gpus)
    return plain(attestation_pb2.EvidenceBody(os=posture, gpu=state))


def _converted(body: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> int:
    """Characters of document handed to the CEL runtime in one evaluation: converting the
    document is the cost that grows with it (rules themselves run in microseconds)."""
    real = cel.Context
    sizes: list[int] = []

    def counting(
        variables: dict[str, Any] | None = None,
        functions: dict[str, Callable[..., Any]] | None = None,
    ) -> cel.Context:
        sizes.append(sum(len(repr(a)) for a in (variables, functions) if a is not None))
        return real(variables, functions)

    with monkeypatch.context() as m:
        m.setattr(cel, "Context", counting)
        doc = build(body, bulletins=POLICY.bulletins, zone="production-inference")
        out = POLICY.evaluate(doc, device_id="d1", zone="production-inference")
    assert sum(f.id == "gpu.ecc_enabled" for f in out.findings) == len(out.submods) // 2
    return sum(sizes)


def test_policy_cost_is_linear_in_the_gpu_count(
    posture: attestation_pb2.OsPosture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half the GPUs fail a rule. With 32 times the GPUs, 32 times as much document may be
    converted to CEL values, not more: the quadratic evaluation this replaced converted the
    whole document again for each failing GPU (about 500 times as much here). Counted, not
    timed: `python -m bench.policy` measures the time (README, "Benchmarks")."""
    small = _converted(_many_gpus(16, posture), monkeypatch)
    large = _converted(_many_gpus(512, posture), monkeypatch)
    assert large <= 33 * small, f"512 GPUs convert {large / small:.0f}x what 16 GPUs do"


def test_fields_no_rule_reads_are_never_converted(
    posture: attestation_pb2.OsPosture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device may send 8,192 listening sockets and 1,024 Xids per GPU (within the limits);
    the default policy reads neither, so neither is converted to CEL values: the cost of an
    evaluation is what the rules read, not what the device chose to send."""
    plain_body = _many_gpus(16, posture)
    padded = attestation_pb2.OsPosture()
    padded.CopyFrom(posture)
    padded.listening.extend(
        attestation_pb2.ListeningSocket(protocol="tcp", address="127.0.0.1", port=40000 + k)
        for k in range(8192)
    )
    gpus = [_gpu(i, ecc=i % 2 == 0) for i in range(16)]
    for g in gpus:
        g.recent_xids.extend([79] * 1024)
    state = attestation_pb2.GpuState(source="nvml", driver_version="580.159.03", gpus=gpus)
    padded_body = plain(attestation_pb2.EvidenceBody(os=padded, gpu=state))
    assert _converted(padded_body, monkeypatch) == _converted(plain_body, monkeypatch)


def test_a_rule_that_reads_a_field_still_sees_it(posture: attestation_pb2.OsPosture) -> None:
    """Pruning keeps what rules select: a host rule on os.listening and a GPU rule on
    this.recent_xids see the values."""
    policy = Policy.parse(
        "policy_id: p\nrules:\n"
        "  - id: no-telnet\n    description: nothing listens on 23\n    claim: configuration\n"
        "    severity: warning\n    expr: os.listening.all(l, l.port != 23)\n"
        "  - id: no-xid-79\n    description: no Xid 79\n    claim: hardware\n"
        "    severity: warning\n    scope: gpu\n    expr: '!(79 in this.recent_xids)'\n",
        source="p.yaml",
        base=Path(),
    )
    os = attestation_pb2.OsPosture()
    os.CopyFrom(posture)
    os.listening.append(attestation_pb2.ListeningSocket(protocol="tcp", port=23))
    gpu = _gpu(0)
    gpu.recent_xids.append(79)
    body = plain(
        attestation_pb2.EvidenceBody(os=os, gpu=attestation_pb2.GpuState(gpus=[gpu, _gpu(1)]))
    )
    out = policy.evaluate(build(body, bulletins=POLICY.bulletins), device_id="d1")
    assert sorted((f.id, f.subject) for f in out.findings) == [
        ("no-telnet", ""),
        ("no-xid-79", out.submods[0].name),
    ]


def test_a_driver_version_with_thousands_of_digits_is_only_an_old_driver() -> None:
    """int() refuses strings of more than 4,300 digits; a device's driver version must not
    make the appraisal fail."""
    from devtrust.verifier.document import version_tuple

    assert version_tuple("580." + "9" * 5000) == (580, 999_999_999_999_999_999)
    gpu = attestation_pb2.GpuState(source="nvml", driver_version="580." + "9" * 5000)
    doc = build(plain(attestation_pb2.EvidenceBody(gpu=gpu)), bulletins=POLICY.bulletins)
    assert doc["gpu"]["missing_bulletins"] == []


def test_a_driver_version_that_is_no_version_is_unknown_not_clean() -> None:
    """A device-sent driver version that is not digits and dots has no branch and no
    bulletins to compare with: the bulletin rule reads it as unknown (policy.unknown), where
    it would otherwise find no bulletin missing and pass."""
    for version in ("abc", "580.105.08 (patched)", "580.105.08<script>", "999.1, bulletin 1"):
        gpu = attestation_pb2.GpuState(source="nvml", driver_version=version)
        body = plain(attestation_pb2.EvidenceBody(gpu=gpu))
        doc = build(body, bulletins=POLICY.bulletins)
        assert doc["gpu"]["driver_version"] is None
        assert doc["gpu"]["missing_bulletins"] is None
        out = POLICY.evaluate(doc, device_id="d1")
        unknown = [f for f in out.findings if f.id == "policy.unknown"]
        assert any("gpu.driver.security_bulletins" in f.message for f in unknown), out.findings
